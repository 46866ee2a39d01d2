"""report: the markdown summary and its plots, built from the stages' JSON outputs alone."""

from __future__ import annotations

import json
from pathlib import Path

from cptflow.core.io import write_json, write_jsonl
from cptflow.data.funnel import summarise
from cptflow.eval.compare import compare
from cptflow.eval.summary import correctness
from cptflow.eval.summary import summarise as summarise_acc
from cptflow.report import report


def manifest(stage: str, docs_in: int, docs_out: int, **params) -> dict:
    return {"stage": stage, "params": params, "counts": {
        "docs_in": docs_in, "docs_out": docs_out, "chars_in": 10 * docs_in, "chars_out": 10 * docs_out,
        f"dropped/{stage}_x": docs_in - docs_out, f"dropped_chars/{stage}_x": 10 * (docs_in - docs_out)}}


def results(model: str, right: int, bpc: float, n: int = 40) -> dict:
    """One model's evaluate output for a benchmark of n questions, the first ``right`` answered correctly."""
    rows = [{"subject": "logic", "qid": str(i), "answer": "A", "first_token": "A" if i < right else "B",
             "option_loglik": "A" if i < right else "C", "option_loglik_norm": "A"} for i in range(n)]
    bench = {"template": {"sha256": "abc"}, **summarise_acc(rows, lambda s: "stem"), "correct": correctness(rows)}
    return {"model": model, "benchmarks": {"ceval": bench},
            "heldout": {"zh": {"bpc": bpc, "bpb": bpc / 3, "tokens_per_char": 0.7}}}


def test_report_has_every_section_and_plot(tmp_path: Path):
    funnel = summarise([manifest("ingest", 100, 98), manifest("clean", 98, 90),
                        manifest("shards", 90, 90, category="zh")])
    write_json(tmp_path / "funnel.json", funnel)
    # base 10/40 right, embed_align 11/40 (noise), full 20/40 (+25 points, outside noise)
    table, md = compare([results("base", 10, 5.5), results("embed_align", 11, 4.0), results("full", 20, 3.25)])
    write_json(tmp_path / "compare.json", table)
    (tmp_path / "compare.md").write_text(md, encoding="utf-8")
    write_jsonl(tmp_path / "m.jsonl", [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 100.0} for s in range(1, 6)])
    write_json(tmp_path / "manifest.json", {"scheme": "xor-bits", "adapted": {"files": {
        "model.safetensors": {"sha256": "f" * 64}}}})
    rc = report.main(["--run-name", "t", "--funnel", str(tmp_path / "funnel.json"), "--train-metrics",
                      f"full={tmp_path / 'm.jsonl'}", "--compare", str(tmp_path / "compare.json"),
                      "--delta-manifest", str(tmp_path / "manifest.json"), "--output-dir", str(tmp_path / "out")])
    assert rc == 0
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    for heading in ("## 1. Data funnel", "## 3. Continual pre-training", "## 4. Evaluation", "## 5. Release"):
        assert heading in summary
    assert "| full | 5 | 4.900 | 4.500 |" in summary  # steps, first and last loss of the stage
    assert "+25.0 [" in summary  # the accuracy difference of the compare table, with its interval
    assert "## 4. Evaluation: base, embed_align, full" in summary
    assert "- ceval, first token: full − base = +25.0 [" in summary and "outside noise" in summary
    assert "embed_align − base" in summary and "within noise" in summary  # the 1-question gain of embed_align
    assert "f" * 64 in summary
    for png in report.PLOTS:
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "funnel.json").read_text())["stages"][1]["docs_out"] == 90
