"""Benchmark: expanding a real byte-level BPE tokenizer (SmolLM2-135M's) for Chinese, cptflow vs the naive routes.

Usage::

    .venv/bin/python bench/bpe_vocab.py                # writes the `bpe_vocab` section of bench/RESULTS.md
    .venv/bin/python bench/bpe_vocab.py --no-write --sizes 8000

Text: ``--corpus``/zh_modern.jsonl (the shared modern Chinese: Wikipedia, stories, technical prose with
code) minus the 116 documents of the repository's held-out file, which are measured instead
(``workflow/resources/demo/heldout/zh_modern.jsonl``); English: the repository's held-out Shakespeare plus
the first 200 documents of ``--corpus``/en_gutenberg.jsonl; code: every Python file of ``src/`` without
a CJK character. Base: ``workflow/resources/smollm2/tokenizer`` (SmolLM2-135M, 49,152 tokens).

Routes, each adding about the same number of tokens:

* ``cptflow continued_bpe``: the real ``vocab`` stage (``python -m cptflow.tokenizer.vocab``, method
  continued_bpe), one subprocess per setting, timed with its peak RSS (``os.wait4``);
* ``add_tokens``: ``tokenizer.add_tokens`` of the most frequent Chinese character n-grams (n = 1..4,
  within runs of CJK characters) of the same text that are not already one base token;
* ``separate BPE appended``: a byte-level BPE trained from scratch on the same text with the base's
  own pre-tokeniser (``tokenizers`` BpeTrainer), whose tokens and merges that the base lacks are
  appended after the base's (the usual "merge two tokenizer.json files").

For each: tokens per character on held-out Chinese and English, new tokens that encoding their own
text does not give alone ("unreachable"), English and code texts whose ids differ from the base's,
held-out Chinese that does not decode back to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

from results_md import run_info, write_section  # noqa: E402 (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
WORK = ROOT / "bench" / "_work" / "bpe_vocab"
SECTION = "bpe_vocab"
SMOL = ROOT / "workflow" / "resources" / "smollm2" / "tokenizer"
DEMO = ROOT / "workflow" / "resources" / "demo"
CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def read_jsonl(path: Path, n: int | None = None) -> list[str]:
    from cptflow.tokenizer.compression import iter_texts

    return list(islice(iter_texts(path), n))


def prepare(corpus: Path) -> dict:
    """The training file (held-out documents removed) and the texts every route is measured on."""
    from cptflow.tokenizer.sp_merge import has_cjk

    WORK.mkdir(parents=True, exist_ok=True)
    held_zh = read_jsonl(DEMO / "heldout" / "zh_modern.jsonl")
    held = set(held_zh)
    train = WORK / "zh_modern_train.jsonl"
    docs = read_jsonl(corpus / "zh_modern.jsonl")
    kept = [t for t in docs if t not in held]
    with open(train, "w", encoding="utf-8") as f:
        for t in kept:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    en = read_jsonl(DEMO / "heldout" / "en.jsonl") + read_jsonl(corpus / "en_gutenberg.jsonl", 200)
    code = [t for t in (p.read_text(encoding="utf-8") for p in sorted((ROOT / "src").rglob("*.py"))) if not has_cjk(t)]
    return {"train": train, "train_docs": len(kept), "dropped": len(docs) - len(kept),
            "train_chars": sum(map(len, kept)), "zh": held_zh, "en": en, "code": code,
            "classical": corpus / "zh_classical.jsonl"}


def run_stage(name: str, train: list[Path], params: dict, data: dict) -> dict:
    """The real vocab stage in a subprocess: its manifest, wall time and peak RSS."""
    out = WORK / name
    cmd = [sys.executable, "-m", "cptflow.tokenizer.vocab", "--base-tokenizer", str(SMOL),
           "--train-text", *map(str, train), "--heldout-zh", str(DEMO / "heldout" / "zh_modern.jsonl"),
           "--heldout-en", str(DEMO / "heldout" / "en.jsonl"), "--output-dir", str(out / "tok"),
           "--stats", str(out / "s.json"), "--params", json.dumps({"method": "continued_bpe", **params})]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"vocab stage failed ({name}):\n{err[-3000:]}")
    m = json.loads((out / "s.json").read_text(encoding="utf-8"))
    return {"name": name, "dir": out / "tok", "manifest": m, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_mb": usage.ru_maxrss / 1024}


def measure(name: str, tok, base, data: dict, new_strings: dict[int, str]) -> dict:
    """Compression, unreachable new tokens, changed English/code, Chinese round trip, for one tokenizer."""
    def ids(t, texts):
        return t(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    row = {"route": name, "new_tokens": len(new_strings)}
    for lang in ("zh", "en"):
        row[f"{lang}_tpc"] = sum(map(len, ids(tok, data[lang]))) / sum(map(len, data[lang]))
    row["base_zh_tpc"] = sum(map(len, ids(base, data["zh"]))) / sum(map(len, data["zh"]))
    items = sorted(new_strings.items())
    got = ids(tok, [s for _, s in items]) if items else []
    row["unreachable"] = sum(g != [i] for (i, _), g in zip(items, got, strict=True))
    for lang in ("en", "code"):
        row[f"{lang}_changed"] = sum(a != b for a, b in zip(ids(tok, data[lang]), ids(base, data[lang]), strict=True))
        row[f"{lang}_texts"] = len(data[lang])
    zh_ids = ids(tok, data["zh"])
    row["zh_roundtrip_fail"] = sum(tok.decode(x, clean_up_tokenization_spaces=False) != t for x, t in zip(zh_ids, data["zh"], strict=True))
    first = len(base)
    row["zh_new_used"] = len({i for x in zh_ids for i in x if i >= first})
    return row


def add_tokens_route(base_dir: Path, train: Path, n: int):
    """add_tokens of the n most frequent CJK n-grams (1..4 characters) that are not one base token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    counts: Counter = Counter()
    for text in read_jsonl(train):
        for run in CJK_RUN.findall(text):
            for k in range(1, 5):
                counts.update(run[i : i + k] for i in range(len(run) - k + 1))
    vocab = tok.get_vocab()
    picked = []
    for s, _ in counts.most_common():
        if len(tok(s, add_special_tokens=False)["input_ids"]) > 1 and s not in vocab:
            picked.append(s)
            if len(picked) == n:
                break
    first = len(tok)
    tok.add_tokens(picked)
    return tok, {first + k: s for k, s in enumerate(picked)}


def separate_bpe_route(base_dir: Path, train: Path, n: int):
    """Train a byte-level BPE on the text alone and append what the base lacks (tokens, then merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cptflow.tokenizer.bpe_merges import token_bytes

    base_text = (base_dir / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(base_text)
    base = Tokenizer.from_str(base_text)
    fresh = Tokenizer(models.BPE())
    fresh.normalizer, fresh.pre_tokenizer = base.normalizer, base.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=256 + n, min_frequency=3, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fresh.train_from_iterator(read_jsonl(train), trainer=trainer)
    fj = json.loads(fresh.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    nxt = max(vocab.values()) + 1
    added = {}
    for a, b in (m if isinstance(m, list) else m.split(" ") for m in fj["model"]["merges"]):
        if a + b in vocab or a not in vocab or b not in vocab:
            continue
        vocab[a + b] = nxt
        merges.append([a, b])
        try:
            added[nxt] = token_bytes(a + b).decode("utf-8")
        except UnicodeDecodeError:
            pass  # a token ending inside a character: no text of its own to encode
        nxt += 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    return tok, added, nxt - len(json.loads(base_text)["model"]["vocab"])


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("/work/shared/data/corpus"))
    p.add_argument("--sizes", default="4000,8000,16000,24000,32000", help="max_new_tokens values for cptflow")
    p.add_argument("--compare", type=int, default=16000, help="tokens every route adds (16000: the default)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    data = prepare(args.corpus)
    base = AutoTokenizer.from_pretrained(str(SMOL))
    curve = []
    for n in sorted({int(x) for x in args.sizes.split(",")} | {args.compare}):
        r = run_stage(f"n{n}", [data["train"]], {"max_new_tokens": n}, data)
        tok = AutoTokenizer.from_pretrained(str(r["dir"]))
        vocab = tok.get_vocab()
        from cptflow.tokenizer.bpe_verify import whole_text

        strings = {i: s for t, i in vocab.items() if i >= len(base) and (s := whole_text(t)) is not None}
        r["row"] = measure(f"cptflow continued_bpe (max_new_tokens {n})", tok, base, data, strings)
        r["row"]["new_tokens"] = r["manifest"]["vocab"]["added"]
        curve.append(r)
        print(f"n={n}: zh {r['row']['zh_tpc']:.3f} in {r['wall_s']:.0f} s, {r['maxrss_mb']:.0f} MB", file=sys.stderr)
    scale = [run_stage(f"scale{c}", [data["train"]], {"max_new_tokens": args.compare, "max_train_chars": c}, data)
             for c in (500_000, 1_000_000)]
    scale += [r for r in curve if r["name"] == f"n{args.compare}"]
    scale.append(run_stage("scale_all", [data["train"], data["classical"]], {"max_new_tokens": args.compare}, data))
    t0 = time.perf_counter()
    at, at_strings = add_tokens_route(SMOL, data["train"], args.compare)
    at_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sep, sep_strings, sep_n = separate_bpe_route(SMOL, data["train"], args.compare)
    sep_s = time.perf_counter() - t0
    rows = [next(r for r in curve if r["name"] == f"n{args.compare}")["row"],
            measure("add_tokens of frequent n-grams", at, base, data, at_strings),
            measure("separate BPE, vocabulary appended", sep, base, data, sep_strings)]
    rows[2]["new_tokens"] = sep_n
    body = report(args, data, curve, scale, rows, (at_s, sep_s), commit, load0)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)
    return 0


def report(args, data, curve, scale, rows, naive_s, commit, load0) -> str:
    import tokenizers
    import transformers

    n = args.compare
    lines = [
        "## bpe_vocab: byte-level BPE expansion of SmolLM2-135M's tokenizer (`bench/bpe_vocab.py`)", "",
        run_info("bpe_vocab.py", load0), f"Commit measured: `{commit}`. Versions: transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}.", "",
        f"Training text: `{args.corpus}/zh_modern.jsonl` without the {data['dropped']} held-out documents: "
        f"{data['train_docs']} documents, {data['train_chars']:,} characters (Chinese prose and technical text with code). "
        f"Measured on: held-out Chinese {len(data['zh'])} texts / {sum(map(len, data['zh'])):,} characters; English "
        f"{len(data['en'])} texts / {sum(map(len, data['en'])):,} characters; code {len(data['code'])} Python files of `src/` "
        f"/ {sum(map(len, data['code'])):,} characters. Base: SmolLM2-135M, 49,152 tokens, Chinese "
        f"{rows[0]['base_zh_tpc']:.3f} tokens/char.", "",
        f"### Three routes, about {n} new tokens each", "",
        "| route | new tokens | zh tokens/char | en tokens/char | unreachable new tokens | English texts with changed ids | code files with changed ids | zh texts not decoding back | new tokens used by held-out zh |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['route']} | {r['new_tokens']} | {r['zh_tpc']:.3f} | {r['en_tpc']:.4f} | {r['unreachable']} | "
                     f"{r['en_changed']}/{r['en_texts']} | {r['code_changed']}/{r['code_texts']} | {r['zh_roundtrip_fail']} | {r['zh_new_used']} |")
    first = next((c for c in curve if c["row"]["zh_tpc"] <= 0.80), None)
    cp, at, sp = rows
    lines += ["", f"With about {n} new tokens, held-out Chinese goes from {cp['base_zh_tpc']:.3f} tokens/char to "
              f"{cp['zh_tpc']:.3f} with cptflow, {at['zh_tpc']:.3f} with add_tokens and {sp['zh_tpc']:.3f} with the appended "
              f"separate BPE ({sp['new_tokens']} of whose tokens the base lacked). The separate BPE changes the ids of "
              f"{sp['en_changed']}/{sp['en_texts']} English texts and {sp['code_changed']}/{sp['code_texts']} code files and "
              f"leaves {sp['unreachable']} new tokens unreachable; cptflow and add_tokens change "
              f"{cp['en_changed'] + cp['code_changed']} and {at['en_changed'] + at['code_changed']} of them and leave "
              f"{cp['unreachable']} and {at['unreachable']} unreachable. Smallest max_new_tokens measured that reaches "
              f"<= 0.80 Chinese tokens/char: {first['name'][1:] if first else 'none'}."]
    lines += ["", f"Time to build: cptflow {curve[[c['name'] for c in curve].index(f'n{n}')]['wall_s']:.0f} s (whole stage incl. verification, "
              f"in a subprocess), add_tokens {naive_s[0]:.0f} s, separate BPE {naive_s[1]:.0f} s (in-process, no checks). "
              "Unreachable counts only new tokens whose bytes are whole characters (the others have no text of their own).", "",
              "### cptflow: Chinese tokens per character against the number of new tokens", "",
              "| max_new_tokens | added | zh tokens/char | en tokens/char | unreachable | English / code ids changed | last pair count | learn CPU s | stage CPU s | stage wall s | peak RSS MB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in curve:
        r, v = c["row"], c["manifest"]["vocab"]
        lines.append(f"| {c['name'][1:]} | {v['added']} | {r['zh_tpc']:.3f} | {r['en_tpc']:.4f} | {r['unreachable']} | "
                     f"{r['en_changed']} / {r['code_changed']} | {v['last_pair_count']} | {v['learn_cpu_seconds']:.1f} | "
                     f"{c['cpu_s']:.0f} | {c['wall_s']:.0f} | {c['maxrss_mb']:.0f} |")
    lines += ["", f"### cptflow: time and memory against the training text (max_new_tokens {n})", "",
              "| training text | characters learned | distinct words | added | learn CPU s | stage CPU s | stage wall s | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in scale:
        m, label = c["manifest"], {"scale_all": "zh_modern + zh_classical"}.get(c["name"], "zh_modern")
        lines.append(f"| {label} | {m['counts']['chars_learned']:,} | {m['counts']['words_distinct']:,} | {m['vocab']['added']} | "
                     f"{m['vocab']['learn_cpu_seconds']:.1f} | {c['cpu_s']:.0f} | {c['wall_s']:.0f} | {c['maxrss_mb']:.0f} |")
    lines += ["", "Stage CPU s and peak RSS cover the whole `vocab` process (imports, reading, learning, writing, "
              "verification, audit); wall time depends on the load of the shared machine."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
