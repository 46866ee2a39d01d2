"""cptflow.pack.encoder: the tokenizer reduced once per run to what pack_shard needs, opened without transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cptflow.model.hf import load_tokenizer
from cptflow.pack.encoder import load_encoder, main, run
from cptflow.pack.pack_config import PackConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "workflow" / "resources" / "demo"
# A SentencePiece base (the demo's Mistral-v0.3 tokenizer) and a byte-level BPE one (SmolLM2's).
TOKENIZERS = {"sentencepiece": DEMO / "tokenizer", "byte_level_bpe": ROOT / "workflow/resources/smollm2/tokenizer"}


def _texts() -> list[str]:
    lines = (DEMO / "corpus/zh_web/cmrc2018_dev.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    return [json.loads(x)["text"][:1500] for x in lines] + [
        "The Devil's Dictionary, 1911.", "def f(x):\n    return x ** 2  # code", "混合 text 与 123", "", "  leading spaces"]


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_encoder_gives_the_ids_and_special_ids_of_the_transformers_tokenizer(tmp_path: Path, kind: str) -> None:
    tok = load_tokenizer(TOKENIZERS[kind])
    assert main(["--tokenizer", str(TOKENIZERS[kind]), "--output-dir", str(tmp_path / "enc"),
                 "--stats", str(tmp_path / "enc.stats.json"), "--params", "{}"]) == 0
    backend, meta = load_encoder(tmp_path / "enc", PackConfig())
    texts = _texts()
    got = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    assert got == tok(texts, add_special_tokens=False)["input_ids"]
    assert (meta["bos"], meta["eos"], meta["pad"]) == (tok.bos_token_id, tok.eos_token_id, tok.eos_token_id)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok)
    # A literal special-token string in the text stays text: it never becomes a document boundary.
    literal = f"a {tok.eos_token} b {tok.bos_token}"
    assert not {tok.bos_token_id, tok.eos_token_id} & set(backend.encode(literal, add_special_tokens=False).ids)
    manifest = json.loads((tmp_path / "enc.stats.json").read_text())
    assert manifest["stage"] == "pack_encoder" and str(TOKENIZERS[kind]) in " ".join(manifest["inputs"])


def test_config_without_bos_and_a_mismatched_encoder_are_refused(tmp_path: Path) -> None:
    run(PackConfig(add_bos=False, pad_token_id=0), TOKENIZERS["sentencepiece"], tmp_path / "enc")
    _, meta = load_encoder(tmp_path / "enc", PackConfig(add_bos=False, pad_token_id=0))
    assert meta["bos"] is None and meta["pad"] == 0
    with pytest.raises(ValueError, match=r"encoder.json: made for .*rerun pack_encoder"):
        load_encoder(tmp_path / "enc", PackConfig())
    with pytest.raises(ValueError, match=r"nowhere: not a pack encoder directory \(missing tokenizer.json"):
        load_encoder(tmp_path / "nowhere")


def test_a_pack_shard_job_never_imports_transformers_or_torch(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run(PackConfig(), TOKENIZERS["sentencepiece"], tmp_path / "enc")
    pq.write_table(pa.table({"text": _texts()}), tmp_path / "s.parquet")
    code = ("import sys; from cptflow.pack.pack_shard import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--encoder", str(tmp_path / "enc"), "--input",
                           str(tmp_path / "s.parquet"), "--category", "zh", "--output-dir", str(tmp_path / "out"),
                           "--params", json.dumps({"max_length": 256})], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "out/meta.json").read_text())["counts"]["docs"] == len(_texts()) - 1  # "" skipped
