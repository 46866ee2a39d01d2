"""Benchmark: cptflow's multiple-choice scorer against lm-evaluation-harness on the same CMMLU questions.

Usage::

    .venv/bin/python bench/eval.py                    # all 480 questions, writes the `eval` section (~6 min)
    .venv/bin/python bench/eval.py --also-threads 2   # + cptflow with 2 torch threads (contention cost; slow)
    .venv/bin/python bench/eval.py --max-questions 5 --no-write

What is compared. A tiny LLaMA (``python -m cptflow.bootstrap``, trained for a few hundred steps on
the demo's English + Chinese web text so that its answers are not ties) is scored on the demo's CMMLU
subjects (agronomy, chinese_foreign_policy, computer_science; test split, 5-shot from dev) twice:

* by ``cptflow.evaluate.run`` (scorings ``first_token``, ``option_loglik``, ``option_loglik_norm``,
  all from one call);
* by lm-eval (``lm_eval.simple_evaluate``, HF backend, same model directory) on two custom task
  families written to bench/_work/eval/tasks/, reading the same CSV files (``dataset_path: csv``):
  ``cptbench_letter_<subject>`` (choices = the letters; its ``acc`` is the first-token argmax when
  each letter is one token) and ``cptbench_text_<subject>`` (choices = the option texts, shots
  answered with the text; ``acc`` / ``acc_norm`` = option_loglik / option_loglik_norm). Prompts
  copy cptflow's C-Eval/CMMLU template: header with the subject name, shots, ``答案：`` cue, no
  delimiter before the answer. The script checks that every prompt lm-eval built equals the one
  cptflow builds, then compares predictions question by question.

lm-eval is NOT a dependency of cptflow: it lives in its own venv (``--lmeval-python``), made once with::

    python3.11 -m venv bench/_work/venv-lmeval
    bench/_work/venv-lmeval/bin/pip install "lm-eval[hf]==0.4.13" -c constraints.txt   # torch stays the CPU 2.13.0

The stock ``cmmlu`` task cannot run here: it downloads ``haonan-li/cmmlu`` from the Hub (no network).
The model is built on first use (``--bootstrap-steps`` steps: about a minute on two idle cores, much
longer on busy ones) into bench/_work/eval/model and reused afterwards.

Timing: each side runs in its own fresh process; the clock covers model loading, reading the
questions, building prompts, scoring and metrics, not Python imports (lm-eval's dataset cache is
filled before the clock starts). Same dtype (float32), batch size and torch threads on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from results_md import run_info, write_section  # noqa: E402 (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "eval"
SECTION = "eval"
DEMO = ROOT / "workflow" / "resources" / "demo"
SUBJECTS = ("agronomy", "chinese_foreign_policy", "computer_science")
SCORE_PAIRS = (("first_token", "letter", "acc"), ("option_loglik", "text", "acc"),
               ("option_loglik_norm", "text", "acc_norm"))


def build_model(out: Path, steps: int) -> dict:
    """A tiny trained LLaMA via cptflow.bootstrap (defaults: hidden 64, 2 layers, base 32768 vocab)."""
    files = sorted(str(p) for d in ("en_replay", "zh_web") for p in (DEMO / "corpus" / d).glob("*.jsonl"))
    cmd = [sys.executable, "-m", "cptflow.bootstrap", "--tokenizer", str(DEMO / "tokenizer"),
           "--train-text", *files, "--output-dir", str(out),
           "--params", json.dumps({"steps": steps})]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return {"seconds": time.perf_counter() - t0}


def subject_name(subject: str) -> str:
    return subject.replace("_", " ")  # cptflow's default when eval.subject_names has no entry


TASK_UTILS = '''"""doc_to_* functions copying cptflow.mc_eval's zh template (written by bench/eval.py)."""
LETTERS = "ABCD"


def doc_to_text(doc):
    # cptflow.mc_eval.question_block: question, "X. option" lines, cue; no strip (cptflow keeps the text as read)
    return "\\n".join([doc["Question"], *(f"{L}. {doc[L]}" for L in LETTERS), "答案："])


def doc_to_target(doc):
    return LETTERS.index(doc["Answer"].strip())


def letter_choices(doc):
    return list(LETTERS)


def text_choices(doc):
    return [doc[L] for L in LETTERS]


def as_str(cell):
    return cell
'''


def write_tasks(task_dir: Path, bench_dir: Path, subjects: list[str], shots: int, header: str) -> list[str]:
    """lm-eval task YAMLs (two per subject) reading the local CSVs; returns the task names.

    YAML is written by hand: lm-eval's ``!function`` tag has no PyYAML dumper. Strings are JSON-quoted
    (a JSON string is a valid YAML double-quoted scalar).
    """
    q = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "cptbench_utils.py").write_text(TASK_UTILS, encoding="utf-8")
    names = []
    for kind in ("letter", "text"):
        for s in subjects:
            name = f"cptbench_{kind}_{s}"
            files = {split: str(bench_dir / split / f"{s}.csv") for split in ("test", "dev")}
            # Every column read as the raw string (pandas would turn "1" into 1, "" into NaN, "True" into
            # a bool): converters keep the cell text, na_filter off keeps empty cells "".
            conv = "".join(f"\n      {q(c)}: !function cptbench_utils.as_str" for c in ("Question", *"ABCD", "Answer"))
            text = f"""task: {q(name)}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {q(files["test"])}
    dev: {q(files["dev"])}
  keep_default_na: false
  na_filter: false
  converters:{conv}
test_split: test
fewshot_split: dev
num_fewshot: {shots}
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {q(header.format(subject=subject_name(s)))}
doc_to_text: !function cptbench_utils.doc_to_text
doc_to_target: !function cptbench_utils.doc_to_target
doc_to_choice: !function cptbench_utils.{kind}_choices
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
            (task_dir / f"{name}.yaml").write_text(text, encoding="utf-8")
            names.append(name)
    return names


# ----------------------------------------------------------------------------- workers
def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (torch's intra-op pool included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_cptflow(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401  (imports are not timed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401 (lazy modules)

    from cptflow.benchmarks import BenchmarkSpec
    from cptflow.evaluate import EvalConfig, run

    cfg = EvalConfig(batch_size=args.batch_size, device="cpu", dtype="float32",
                     max_questions_per_subject=args.max_questions)
    spec = BenchmarkSpec(name="cmmlu", path=args.bench_dir, layout="cmmlu", lang="zh", shots=args.shots,
                         dev_split="dev", eval_split="test", subjects=list(args.subjects))
    out = Path(args.out)
    t0, c0 = time.perf_counter(), cpu_seconds()
    run(cfg, args.model, "bench", [spec], {}, out / "cptflow_results.json", out / "cptflow_predictions.jsonl")
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


def worker_lmeval(args: argparse.Namespace) -> dict:
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (imports are not timed)
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401 (lazy modules)

    out = Path(args.out)
    tasks = [f"cptbench_{k}_{s}" for k in ("letter", "text") for s in args.subjects]
    # Build the tasks once before the clock starts: fills the datasets cache for the CSVs (a one-time
    # cost, not scoring speed); the timed call below builds them again from the warm cache.
    get_task_dict(tasks, TaskManager(include_path=args.task_dir))
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={args.model},dtype=float32,device=cpu,add_bos_token=True",
        tasks=tasks, task_manager=TaskManager(include_path=args.task_dir), batch_size=args.batch_size,
        limit=args.max_questions or None, log_samples=True, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    samples = {}
    for task, rows in res["samples"].items():
        samples[task] = [{"doc_id": r["doc_id"], "qid": r["doc"]["Unnamed: 0"], "target": r["target"],
                          "context": r["arguments"][0][0], "conts": [a[1] for a in r["arguments"]],
                          "loglik": [float(x[0][0]) for x in r["resps"]]} for r in rows]
    (out / "lmeval_samples.json").write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    metrics = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["results"].items()}
    return {"seconds": seconds, "cpu_s": cpu, "version": lm_eval.__version__, "metrics": metrics,
            "n": {t: len(v) for t, v in samples.items()}}


def run_worker(python: str, kind: str, args: argparse.Namespace, extra_env: dict | None = None,
               threads: int | None = None, out: Path = WORK) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, __file__, "--worker", kind, "--model", args.model, "--bench-dir", args.bench_dir,
           "--subjects", *args.subjects, "--shots", str(args.shots), "--batch-size", str(args.batch_size),
           "--max-questions", str(args.max_questions), "--out", str(out), "--task-dir", str(WORK / "tasks")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(WORK / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads or args.threads), **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (WORK / f"{kind}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); log {WORK / f'{kind}.log'}:\n"
                           f"{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# ----------------------------------------------------------------------------- comparison
def compare(args: argparse.Namespace, lm: dict) -> dict:
    """Prompt identity and per-question agreement between cptflow's predictions and lm-eval's samples."""
    from collections import Counter

    from cptflow import mc_eval
    from cptflow.benchmarks import BenchmarkSpec, read_questions
    from cptflow.hf import load_tokenizer

    spec = BenchmarkSpec(name="cmmlu", path=args.bench_dir, layout="cmmlu", lang="zh", shots=args.shots,
                         dev_split="dev", eval_split="test", subjects=list(args.subjects))
    t = mc_eval.TEMPLATES["zh"]
    dev: dict[str, list] = {}
    for q in read_questions(spec, "dev"):
        dev.setdefault(q.subject, [])
        if len(dev[q.subject]) < args.shots:
            dev[q.subject].append(q)
    questions = {(q.subject, q.qid): q for q in read_questions(spec, "test")}
    ours = {(r["subject"], r["qid"]): r for r in map(json.loads, (WORK / "cptflow_predictions.jsonl").open())}
    samples = json.loads((WORK / "lmeval_samples.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(args.model)
    c: Counter = Counter()
    max_dll = 0.0
    for task, rows in samples.items():
        kind, subject = task[len("cptbench_"):].split("_", 1)
        for r in rows:
            q = questions[(subject, str(r["qid"]))]
            mine = ours[(subject, str(r["qid"]))]
            style = "letter" if kind == "letter" else "text"
            prompt = mc_eval.build_prompt(t, subject_name(subject), dev.get(subject, []), q, style)
            c[f"{kind}_prompts"] += 1
            c[f"{kind}_prompt_equal"] += r["context"] == prompt
            pick = "ABCD"[max(range(4), key=r["loglik"].__getitem__)]
            if kind == "letter":
                c["letter_agree"] += pick == mine["first_token"]
                # log-softmax differences between letters equal logit differences: compare those.
                lg, ll = mine["letter_logits"], r["loglik"]
                max_dll = max(max_dll, *(abs((lg[i] - lg[0]) - (ll[i] - ll[0])) for i in range(4)))
            else:
                c["text_agree"] += pick == mine["option_loglik"]
                norm = [v / len(o) for v, o in zip(r["loglik"], r["conts"])]
                c["norm_agree"] += "ABCD"[max(range(4), key=norm.__getitem__)] == mine["option_loglik_norm"]
                c["text_max_dll_x1e6"] = max(c["text_max_dll_x1e6"], int(1e6 * max(
                    abs(a - b) for a, b in zip(r["loglik"], mine["option_logprob"]))))
                # lm-eval splits context/continuation at len(tokens(context)); cptflow at the common prefix.
                p_ids = tok(prompt)["input_ids"]
                for o in q.options:
                    f = tok(prompt + o)["input_ids"]
                    c["text_boundary_merges"] += f[:len(p_ids)] != p_ids
    c["letter_max_dlogit_x1e6"] = int(1e6 * max_dll)
    return dict(c)


def report(args: argparse.Namespace, ours: dict, lm: dict | None, cmp: dict | None, model_info: dict,
           lm_error: str | None) -> str:
    import torch
    import transformers

    res = json.loads((WORK / "cptflow_results.json").read_text(encoding="utf-8"))["benchmarks"]["cmmlu"]
    n = res["overall"]["n"]
    lines = ["## eval: multiple-choice scoring, cptflow vs lm-evaluation-harness", "",
             run_info("eval.py", args.load_start),
             f"Versions: torch {torch.__version__}, transformers {transformers.__version__}"
             + (f", lm-eval {lm['version']} (separate venv `bench/_work/venv-lmeval`)" if lm else "") + ".", "",
             f"Model: {model_info['desc']}. Questions: demo CMMLU "
             f"({', '.join(args.subjects)}), test split, {args.shots}-shot from dev (first {args.shots}), "
             f"{n} questions{f' (first {args.max_questions} per subject)' if args.max_questions else ''}. "
             f"CPU, float32, batch size {args.batch_size}, {args.threads} torch thread(s) (OMP_NUM_THREADS) "
             "on both sides.", ""]
    if lm is None:
        lines += [f"**lm-eval did not run: {lm_error}**", ""]
    lines += ["### Accuracy (%)", "",
              "| subject | n | cptflow first_token | lm-eval letter acc | cptflow option_loglik | lm-eval text acc "
              "| cptflow option_loglik_norm | lm-eval text acc_norm |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(s, res["subjects"][s]) for s in args.subjects if s in res["subjects"]] + [("**overall**", res["overall"])]
    for s, part in rows:
        cells = [s, str(part["n"])]
        for ours_key, kind, metric in SCORE_PAIRS:
            cells.append(f"{100 * part['accuracy'][ours_key]:.2f}")
            if lm:
                if s.startswith("**"):
                    tot = sum(lm["metrics"][f"cptbench_{kind}_{x}"][f"{metric},none"] * lm["n"][f"cptbench_{kind}_{x}"]
                              for x in args.subjects)
                    val = tot / sum(lm["n"][f"cptbench_{kind}_{x}"] for x in args.subjects)
                else:
                    val = lm["metrics"][f"cptbench_{kind}_{s}"][f"{metric},none"]
                cells.append(f"{100 * val:.2f}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Speed", "",
              "| scorer | what it computes | wall s | questions/s | CPU s | questions per CPU-s | process wall s |",
              "|---|---|---:|---:|---:|---:|---:|",
              f"| cptflow (`cptflow.evaluate.run`) | first_token + option_loglik(+norm) in one call | "
              f"{ours['seconds']:.1f} | {n / ours['seconds']:.2f} | {ours['cpu_s']:.1f} | {n / ours['cpu_s']:.2f} | "
              f"{ours['process_wall_s']:.1f} |"]
    for t, r in ours.get("other_threads", {}).items():
        lines.append(f"| cptflow, {t} torch threads (OMP_NUM_THREADS={t}) | the same | {r['seconds']:.1f} | "
                     f"{n / r['seconds']:.2f} | {r['cpu_s']:.1f} | {n / r['cpu_s']:.2f} | {r['process_wall_s']:.1f} |")
    if lm:
        lines.append(f"| lm-eval {lm['version']} (`simple_evaluate`, hf) | letter task + text task "
                     f"({2 * n} docs, {8 * n} loglikelihood requests) | {lm['seconds']:.1f} | "
                     f"{n / lm['seconds']:.2f} | {lm['cpu_s']:.1f} | {n / lm['cpu_s']:.2f} | "
                     f"{lm['process_wall_s']:.1f} |")
        lines += ["", f"**Speed ratio: cptflow answers {lm['seconds'] / ours['seconds']:.1f}x as many questions per "
                  f"wall-clock second ({lm['cpu_s'] / ours['cpu_s']:.1f}x per CPU-second) as lm-eval for the same "
                  f"three scorings, both with {args.threads} torch thread(s).** The clock covers model loading, "
                  "reading questions, prompt building, scoring and "
                  "metrics (not imports); 'process wall s' is the whole subprocess. Most of the gap is by design: cptflow runs the "
                  "transformer body once per sequence and applies the vocabulary projection only where a score is "
                  "needed (the last position for the letters, the option's tokens for the text), while lm-eval takes "
                  "the full `[batch, length, vocab]` logits and a log-softmax over every position; for this model "
                  f"the projection is {100 * model_info['head_share']:.0f}% of the weight FLOPs per token. "
                  "lm-eval reuses one forward pass for the four one-token letter continuations (same context), as "
                  "cptflow does."]
    for t, r in ours.get("other_threads", {}).items():
        lines += ["", f"With {t} torch threads cptflow needed {r['seconds'] / ours['seconds']:.1f}x the wall time and "
                  f"{r['cpu_s'] / ours['cpu_s']:.1f}x the CPU time of the {args.threads}-thread run on this shared "
                  "machine: when another job holds a core, OpenMP worker threads spin-wait at every small op of this "
                  "tiny model. That is why the comparison uses one thread on each side."]
    if cmp:
        lp, tp = cmp.get("letter_prompts", 0), cmp.get("text_prompts", 0)
        lines += ["", "### What matched and what did not", "",
                  f"- Prompts: {cmp.get('letter_prompt_equal', 0)}/{lp} letter-task and "
                  f"{cmp.get('text_prompt_equal', 0)}/{tp} text-task contexts built by lm-eval are character-for-"
                  "character equal to `cptflow.mc_eval.build_prompt` (header `以下是中国关于{subject}考试的单项选择题，"
                  "请选出其中的正确答案。`, subject name as cptflow prints it, 5 dev shots in file order answered by "
                  "letter resp. option text, `答案：` cue, `target_delimiter: \"\"`, `fewshot_delimiter: \"\\n\\n\"`).",
                  "- BOS: both add it (lm-eval with `add_bos_token=True`, cptflow through the tokenizer default).",
                  f"- Predictions: first_token = lm-eval letter acc on {cmp.get('letter_agree', 0)}/{lp} questions; "
                  f"option_loglik = lm-eval text acc on {cmp.get('text_agree', 0)}/{tp}; option_loglik_norm = "
                  f"acc_norm on {cmp.get('norm_agree', 0)}/{tp}.",
                  f"- Scores: option-text log-likelihoods differ by at most {cmp.get('text_max_dll_x1e6', 0) / 1e6:.2g} "
                  f"nats; letter log-prob differences vs. logit differences by at most "
                  f"{cmp.get('letter_max_dlogit_x1e6', 0) / 1e6:.2g} (float32 summation order: left vs. right padding, "
                  "different batch composition; cptflow rounds stored values to 1e-5).",
                  f"- Token boundary: {cmp.get('text_boundary_merges', 0)} (question, option) pairs where the prompt's "
                  "tokens are not a prefix of prompt+option's tokens (lm-eval would then score a wrongly split "
                  "continuation; cptflow scores from the common prefix). 0 means the two splits are identical.",
                  "- Not the stock lm-eval `cmmlu` task: that one downloads `haonan-li/cmmlu` from the Hub (not "
                  "reachable here) and uses another template (`以下是关于{中文科目名}的单项选择题，请直接给出正确答案的"
                  "选项。`, `Question.strip()`, target delimiter `\" \"`, letter choices only), so its numbers are not "
                  "comparable with cptflow's by construction. Its `acc_norm` over letters would equal `acc` (all "
                  "choices one character). The custom tasks here copy cptflow's template instead, to test that "
                  "the scoring itself agrees.",
                  "- Metrics: lm-eval `acc_norm` divides by the choice's characters, as cptflow's "
                  "option_loglik_norm does (with `target_delimiter: \"\"` the continuation is exactly the option "
                  "text)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(WORK / "model"), help="HF model dir (built with cptflow.bootstrap if missing)")
    p.add_argument("--bootstrap-steps", type=int, default=300, help="training steps when building the model")
    p.add_argument("--bench-dir", default=str(DEMO / "benchmarks" / "cmmlu"), help="CMMLU layout: dev/ and test/ CSVs")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS))
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (OMP_NUM_THREADS) on both sides; 1 because on shared cores 2 threads made "
                        "cptflow's scoring up to 10x slower (spinning OpenMP threads)")
    p.add_argument("--also-threads", type=int, nargs="*", default=[],
                   help="extra cptflow-only runs with these thread counts (reported, not compared)")
    p.add_argument("--max-questions", type=int, default=0,
                   help="first N test questions per subject; 0 = all (480; lm-eval needs ~4-5 min of that)")
    p.add_argument("--lmeval-python", default=str(ROOT / "bench" / "_work" / "venv-lmeval" / "bin" / "python"))
    p.add_argument("--no-write", action="store_true", help="print the tables only, leave RESULTS.md alone")
    p.add_argument("--worker", choices=("cptflow", "lmeval"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--task-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.load_start = os.getloadavg()

    if args.worker:
        res = (worker_cptflow if args.worker == "cptflow" else worker_lmeval)(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    WORK.mkdir(parents=True, exist_ok=True)
    for f in ("cptflow_predictions.jsonl", "cptflow_results.json", "lmeval_samples.json"):
        (WORK / f).unlink(missing_ok=True)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"building the tiny model into {model} ({args.bootstrap_steps} steps) ...", file=sys.stderr)
        build_model(model, args.bootstrap_steps)
    from cptflow import mc_eval

    cfg = json.loads((model / "config.json").read_text())
    loss = ""
    if (model / "train_loss.jsonl").exists():  # bootstrap's per-step loss curve
        curve = [json.loads(ln) for ln in (model / "train_loss.jsonl").open() if ln.strip()]
        loss = f", training loss {curve[0]['loss']:.2f} -> {curve[-1]['loss']:.2f}"
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
    head = cfg["vocab_size"] * cfg["hidden_size"]
    body = n_params - head * (1 if cfg.get("tie_word_embeddings") else 2)  # embedding lookups cost no FLOPs
    model_info = {"head_share": head / (head + body), "desc": f"`{model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}` — LlamaForCausalLM "
                          f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, "
                          f"{n_params / 1e6:.1f} M parameters, built by `python -m cptflow.bootstrap` on the demo "
                          f"en_replay + zh_web text ({args.bootstrap_steps} steps{loss})"}
    write_tasks(WORK / "tasks", Path(args.bench_dir), args.subjects, args.shots, mc_eval.TEMPLATES["zh"].header)

    ours = run_worker(sys.executable, "cptflow", args, {"PYTHONPATH": str(ROOT / "src")})
    print(f"cptflow: {ours['seconds']:.1f} s", file=sys.stderr)
    ours["other_threads"] = {}
    for t in args.also_threads:  # same scoring, other torch thread counts: how much contention costs
        r = run_worker(sys.executable, "cptflow", args, {"PYTHONPATH": str(ROOT / "src")}, threads=t,
                       out=WORK / f"threads{t}")
        ours["other_threads"][t] = r
        print(f"cptflow with {t} threads: {r['seconds']:.1f} s", file=sys.stderr)
    lm, cmp, lm_error = None, None, None
    if not Path(args.lmeval_python).exists():
        lm_error = f"{args.lmeval_python} not found (make the venv: see the module docstring)"
    else:
        try:
            lm = run_worker(args.lmeval_python, "lmeval", args)
            print(f"lm-eval: {lm['seconds']:.1f} s", file=sys.stderr)
            cmp = compare(args, lm)
        except RuntimeError as e:
            lm_error = str(e).splitlines()[0] + f" (see {WORK / 'lmeval.log'})"
            print(e, file=sys.stderr)
    md = report(args, ours, lm, cmp, model_info, lm_error)
    print(md)
    if not args.no_write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
