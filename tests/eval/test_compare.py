"""compare: every model beside the base, accuracies with standard errors, paired-bootstrap differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cptflow.core.io import read_json
from cptflow.eval import compare
from cptflow.eval.summary import accuracy, correctness, summarise
from cptflow.eval.uncertainty import binomial_se, macro_se, paired_bootstrap


def rows_for(right: list[bool], subject: str = "s") -> list[dict]:
    """Prediction rows where first_token is right exactly where ``right`` says (the other scorings always)."""
    return [{"subject": subject, "qid": f"{i:03d}", "answer": "A", "first_token": "A" if ok else "B",
             "option_loglik": "A", "option_loglik_norm": "A"} for i, ok in enumerate(right)]


def result(model: str, right: list[bool], bpc: float = 2.0) -> dict:
    rows = rows_for(right)
    bench = {"template": {"sha256": "t"}, **summarise(rows, lambda s: "cat"), "correct": correctness(rows)}
    return {"model": model, "benchmarks": {"b": bench},
            "heldout": {"zh": {"bpc": bpc, "bpb": bpc / 3, "tokens_per_char": 0.7}}}


def test_binomial_standard_error_closed_form():
    assert binomial_se(0.3, 100) == pytest.approx((0.3 * 0.7 / 100) ** 0.5)
    # = the population standard deviation of the 0/1 answers over sqrt(n)
    answers = np.array([1] * 7 + [0] * 13)
    assert accuracy(rows_for(list(answers.astype(bool))))["stderr"]["first_token"] == pytest.approx(
        answers.std() / np.sqrt(len(answers)), abs=1e-6)
    assert binomial_se(0.0, 10) == binomial_se(1.0, 10) == binomial_se(0.5, 0) == 0.0
    assert macro_se([0.3, 0.4]) == pytest.approx(0.25)  # sqrt(.09 + .16) / 2


def test_paired_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    one = paired_bootstrap(a, b, samples=500, seed=3, confidence=0.9)
    assert one == paired_bootstrap(a, b, samples=500, seed=3, confidence=0.9)
    assert one == paired_bootstrap(a, b, samples=500, seed=3, confidence=0.9, chunk_rows=7)  # chunking-invariant
    assert one != paired_bootstrap(a, b, samples=500, seed=4, confidence=0.9)
    assert one["delta"] == pytest.approx(b.mean() - a.mean(), abs=1e-6)
    assert one["ci_low"] <= one["delta"] <= one["ci_high"]


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    """Large n: the interval's half-width is about z * sd(b - a) / sqrt(n) (the paired standard error)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 2000)
    b = np.where(rng.random(2000) < 0.8, a, 1 - a)  # the same answer on 80 % of questions
    res = paired_bootstrap(a, b, samples=4000, seed=1, confidence=0.95)
    half = 1.959964 * (b - a).std() / np.sqrt(len(a))
    assert (res["ci_high"] - res["ci_low"]) / 2 == pytest.approx(half, rel=0.08)
    # Pairing matters: two independent binomial intervals would be wider than the paired one.
    unpaired = 1.959964 * np.hypot(binomial_se(a.mean(), len(a)), binomial_se(b.mean(), len(b)))
    assert half < unpaired


def test_noise_verdict():
    same = np.array([1, 0] * 50)
    tie = paired_bootstrap(same, same, samples=200, seed=0, confidence=0.95)
    assert tie["delta"] == tie["ci_low"] == tie["ci_high"] == 0.0 and tie["within_noise"]
    better = paired_bootstrap(np.zeros(200, int), np.r_[np.ones(60, int), np.zeros(140, int)], samples=500, seed=0,
                              confidence=0.95)
    assert not better["within_noise"] and better["ci_low"] > 0
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 0], [1], samples=100, seed=0, confidence=0.95)


def test_compare_stages_side_by_side_with_intervals(tmp_path):
    """Three models (base, two stages) on the same 60 questions: deltas against the base, noise verdicts."""
    base = [i % 4 == 0 for i in range(60)]  # 25 %
    stage1 = [i % 4 == 0 or i == 1 for i in range(60)]  # one more right: noise
    full = [i % 4 == 0 or i % 4 == 1 or i % 8 == 2 for i in range(60)]  # 62 %: outside noise
    paths = []
    for name, right, bpc in (("base", base, 6.0), ("embed_align", stage1, 5.0), ("full", full, 4.0)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result(name, right, bpc)), encoding="utf-8")
    rc = compare.main(["--results", *map(str, paths), "--output-json", str(tmp_path / "t.json"),
                       "--output-md", str(tmp_path / "t.md"), "--params", json.dumps({"seed": 7})])
    assert rc == 0
    table = read_json(tmp_path / "t.json")
    assert table["models"] == ["base", "embed_align", "full"] and table["final"] == "full"
    overall = next(r for r in table["accuracy"] if r["level"] == "overall")
    assert overall["models"]["base"]["first_token"] == 0.25
    assert overall["models"]["base"]["stderr"]["first_token"] == pytest.approx(binomial_se(0.25, 60), abs=1e-6)
    d = {(x["model"], x["scoring"]): x for x in table["differences"]}
    assert d[("embed_align", "first_token")]["within_noise"] and d[("embed_align", "first_token")]["n"] == 60
    assert not d[("full", "first_token")]["within_noise"]
    assert d[("full", "option_loglik")]["delta"] == 0.0  # always right on both
    assert d[("full", "first_token")] == {"benchmark": "b", "model": "full", "scoring": "first_token", "paired": True,
                                          **paired_bootstrap([int(x) for x in base], [int(x) for x in full],
                                                             samples=1000, seed=7, confidence=0.95)}
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "| benchmark | scoring | n | base | embed_align | full | Δ embed_align − base | Δ full − base |" in md
    assert "| b | first token | 60 | 25.0 ± 5.6 |" in md
    assert compare.diff_text(d[("embed_align", "first_token")]) + " |" in md
    assert "within noise" in compare.diff_text(d[("embed_align", "first_token")])
    assert "| zh | bits/char | 6.0000 | 5.0000 | 4.0000 |" in md


def test_compare_refuses_to_pair_different_questions():
    a, b = result("base", [True, False]), result("x", [True, False, True])
    table, md = compare.compare([a, b])
    assert table["differences"] == [{"benchmark": "b", "model": "x", "paired": False,
                                     "reason": "the two results do not hold the same questions"}]
    assert "not paired" in md
    with pytest.raises(ValueError, match="must differ"):
        compare.compare([a, a])
