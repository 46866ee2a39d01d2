"""conversations: the three formats read into one form; bad lines quarantined with file:line and reason, the run
goes on; conversations containing a benchmark question dropped like pre-training documents."""

import gzip
import json
from pathlib import Path

import pytest

from cptflow.data import decontaminate_index
from cptflow.eval.benchmarks import BenchmarkSpec, read_questions
from cptflow.sft import conversations
from cptflow.sft.formats import BadConversation, parse_line
from support.sft import FIREFLY, firefly_lines, firefly_messages

# (line, expected reason) for every kind of bad line; None = a good conversation
BAD = [
    ('{"conversation": [{"human": "你好", "assistant": ""}]}', "sft_empty_assistant"),
    ('{"conversation": [{"human": "  ", "assistant": "好"}]}', "sft_empty_user"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "tool", "value": "x"}]}', "sft_unknown_role"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "sft_not_alternating"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "sft_not_alternating"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "sft_not_alternating"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},'
     ' {"role": "assistant", "content": "b"}]}', "sft_not_alternating"),
    ('{"messages": [{"role": "developer", "content": "a"}]}', "sft_unknown_role"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}', "sft_bad_turn"),
    ('{"conversation": [{"human": "q"}]}', "sft_bad_turn"),
    ('{"conversation": ["q"]}', "sft_bad_turn"),
    ('{"conversation": []}', "sft_no_turns"),
    ('{"messages": [{"role": "system", "content": "s"}]}', "sft_no_turns"),
    ('{"text": "a document, not a conversation"}', "sft_unknown_format"),
    ('{"messages": "hello"}', "sft_unknown_format"),
    ('[1, 2]', "sft_not_object"),
    ('{"conversation": [{"human": "cut in the mid', "sft_bad_json"),
]
GOOD = [
    '{"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "一加一？"},'
    ' {"from": "gpt", "value": "二。"}]}',
    '{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},'
    ' {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}',
]


def test_the_three_formats_read_into_one_form():
    system, q, a = "你是助手", "一加一？", "二。"
    want = [{"role": "system", "content": system}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    lines = [{"system": system, "conversation": [{"human": q, "assistant": a}]},
             {"conversations": [{"from": "system", "value": system}, {"from": "human", "value": q},
                                {"from": "gpt", "value": a}]},
             {"messages": want}]
    for obj in lines:
        assert parse_line(json.dumps(obj, ensure_ascii=False).encode()) == want
    assert [len(parse_line(x.encode())) for x in firefly_lines()] == [len(m) for m in firefly_messages()]
    with pytest.raises(BadConversation) as e:  # a forced format reads only its own key
        parse_line(json.dumps(lines[1]).encode(), "messages")
    assert e.value.reason == "sft_unknown_format"


def _mixed_file(path: Path) -> tuple[Path, list[tuple[int, str]], int]:
    """The 33 real conversations with every kind of bad line (and two good ones of the other formats) between."""
    real = firefly_lines()
    rows, bad, good = [], [], len(real) + len(GOOD)
    for i, line in enumerate(real):
        rows.append(line.encode())
        if i < len(BAD):
            rows.append(BAD[i][0].encode())
            bad.append((len(rows), BAD[i][1]))
        if i == 3:
            rows.append(b"")  # blank line: skipped, not a record
        if i == 5:
            rows.append(b'{"conversation": [{"human": "\xff\xfe", "assistant": "x"}]}')
            bad.append((len(rows), "sft_bad_utf8"))
    rows += [g.encode() for g in GOOD]
    rows.append(real[0][: len(real[0]) // 2].encode())  # a real line cut in half: the last line of a dead download
    bad.append((len(rows), "sft_bad_json"))
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path, bad, good


@pytest.mark.parametrize("gz", [False, True], ids=["jsonl", "jsonl.gz"])
def test_malformed_file_runs_to_the_end_with_each_bad_line_quarantined(tmp_path, gz):
    src, bad, good = _mixed_file(tmp_path / "mixed.jsonl")
    if gz:
        src = tmp_path / "mixed.jsonl.gz"
        src.write_bytes(gzip.compress((tmp_path / "mixed.jsonl").read_bytes()))
    out = {k: tmp_path / f"{k}.jsonl" for k in ("out", "q", "d")}
    rc = conversations.main(["--input", str(src), "--source", "mix", "--part", "mixed", "--output", str(out["out"]),
                             "--quarantine", str(out["q"]), "--dropped", str(out["d"]), "--stats",
                             str(tmp_path / "s.json"), "--params", json.dumps({"decontaminate": False})])
    assert rc == 0
    quarantined = [json.loads(x) for x in out["q"].read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in quarantined] == bad
    assert all(r["file"] == str(src) and r["excerpt"] and r["detail"] for r in quarantined)
    kept = [json.loads(x) for x in out["out"].read_text(encoding="utf-8").splitlines()]
    assert len(kept) == good
    assert kept[0]["id"] == "mix/mixed:1" and kept[0]["messages"] == firefly_messages()[0]
    assert kept[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    counts = json.loads((tmp_path / "s.json").read_text())["counts"]
    assert counts["docs_in"] == good + len(bad) and counts["docs_out"] == good
    assert counts["skipped/sft_empty_line"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("dropped/")) == len(bad)
    assert counts["dropped/sft_not_alternating"] == sum(r == "sft_not_alternating" for _, r in bad)


def test_a_file_of_mostly_bad_lines_fails_naming_it(tmp_path, capsys):
    src = tmp_path / "wrong.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n' + firefly_lines()[0] + "\n", encoding="utf-8")
    rc = conversations.main(["--input", str(src), "--source", "w", "--part", "wrong", "--output", str(tmp_path / "o"),
                             "--quarantine", str(tmp_path / "q"), "--dropped", str(tmp_path / "d"),
                             "--stats", str(tmp_path / "s.json"),
                             "--params", json.dumps({"decontaminate": False, "max_bad_fraction": 0.5})])
    assert rc == 2
    assert "wrong.jsonl: 2 of 3 lines are bad" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # atomic: no partial output


def test_conversations_quoting_a_benchmark_question_are_dropped(demo_dir, tmp_path):
    specs = [{"name": "ceval", "path": str(demo_dir / "benchmarks" / "ceval"), "layout": "ceval", "lang": "zh"}]
    index = tmp_path / "index.npz"
    assert decontaminate_index.main(["--benchmarks", json.dumps(specs), "--output", str(index),
                                     "--stats", str(tmp_path / "i.json")]) == 0
    q = next(q for q in read_questions(BenchmarkSpec(**specs[0]), "val") if len(q.question) >= 25)
    lines = firefly_lines()
    planted = json.loads(lines[4])
    planted["conversation"][1]["assistant"] += "\n例题：" + q.question  # inside a later answer, not the first turn
    lines[4] = json.dumps(planted, ensure_ascii=False)
    src = tmp_path / "f.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = conversations.run(conversations.ConversationsConfig(), src, tmp_path / "o.jsonl", tmp_path / "q.jsonl",
                              tmp_path / "d.jsonl", source="firefly", part="f", index=index)
    dropped = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in dropped] == ["firefly/f:5"]
    assert dropped[0]["match"] == {"benchmark": "ceval", "subject": q.subject, "split": "val", "qid": q.qid}
    assert stats["docs_out"] == 32 and stats["dropped/sft_decontaminate_ngram"] == 1 and stats["matched/ceval"] == 1
    clean = conversations.run(conversations.ConversationsConfig(), FIREFLY, tmp_path / "o2", tmp_path / "q2",
                              tmp_path / "d2", source="firefly", part="f", index=index)
    assert clean["docs_out"] == 33
