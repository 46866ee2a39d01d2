"""Writing a bare SentencePiece tokenizer in the Hugging Face form the rest of the DAG loads.

The demo's base tokenizer ships as the model repository published it (``tokenizer.model`` and a
``tokenizer_config.json`` naming ``LlamaTokenizer``). Loaded that way, transformers 5 rebuilds the
tokenizer from the ``.model`` with merges ordered by id, which disagrees with sentencepiece on runs
of spaces; the bootstrap model would then learn a tokenization the expanded tokenizer does not
reproduce. This stage writes ``tokenizer.json`` exactly as ``cptflow.tokenizer.sp_merge`` writes the expanded
one and checks it against sentencepiece before anything trains on it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cptflow.core import cli
from cptflow.tokenizer.chat_templates import TEMPLATE_DIR, TEMPLATE_FILE, tokenizer_config
from cptflow.tokenizer.compression import read_texts
from cptflow.core.io import atomic_path
from cptflow.tokenizer.sp_merge import load_proto
from cptflow.tokenizer.sp_to_hf import save_hf_tokenizer, verify_hf
from cptflow.core.stats import Stats, Timer, write_manifest

VERSION = 2  # 2: the chat template of a base that keeps it in chat_template.jinja is kept


def run(source_dir: str, output_dir: str, check_texts: Sequence[str], stats_path: str | None = None) -> Stats:
    src = Path(source_dir)
    model = src / "tokenizer.model"
    if not model.is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.model (a SentencePiece model) in the base tokenizer folder")
    conf_path = src / "tokenizer_config.json"
    base_cfg = tokenizer_config(src)
    proto = load_proto(model.read_bytes())
    stats = Stats()
    with Timer() as t, atomic_path(output_dir) as tmp:
        save_hf_tokenizer(proto, tmp, base_cfg)
        verify_hf(tmp, proto, check_texts)
    stats.update("vocab_size", len(proto.pieces))
    stats.update("check_texts", len(check_texts))
    if stats_path:
        inputs = [model] + [p for p in (conf_path, src / TEMPLATE_FILE, src / TEMPLATE_DIR) if p.exists()]
        write_manifest(stats_path, stage="base_tokenizer", version=VERSION, params={}, inputs=inputs,
                       stats=stats, seconds=t.seconds, outputs=[output_dir])
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    def build(p):
        p.add_argument("--tokenizer", required=True, help="folder with tokenizer.model [+ tokenizer_config.json]")
        p.add_argument("--check-text", nargs="*", default=[], help="JSONL files whose texts must encode identically")
        p.add_argument("--output-dir", required=True)
        p.add_argument("--stats")

    def go(args, params):
        texts = [t for f in args.check_text for t in read_texts(f)]
        run(args.tokenizer, args.output_dir, texts, args.stats)

    return cli.stage_main("base_tokenizer", argv, build, go)


if __name__ == "__main__":
    sys.exit(main())
