"""Everything a run config names, checked when the workflow starts, before any job runs.

The schema checks types and keys; this checks what the schema cannot: that every path the config
names exists (benchmark folders and their splits, held-out files, DeepSpeed configs, the bootstrap
recipe's tokenizer and text, the SFT branch's conversation files, template and DeepSpeed json), that every
name it uses refers to something configured (benchmarks in ``decontaminate.benchmarks``, categories in
``vocab``, ``pack`` and ``train``, ``sft.start_from``), and that each
stage's section builds its dataclass (whose cross-field rules include ``bands * rows == num_perm``).
Without this, an unknown ``decontaminate.benchmarks`` name or a missing benchmark folder failed only
after every dedup job had run, and the band arithmetic failed as a bare ValueError while Snakemake
built the DAG. Every problem is reported at once, each line starting with its config key.

Relative paths are looked up as the rules look them up: from the working directory, then from the
repository (where the demo data lives).
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Collection, Mapping
from typing import Any

from cptflow.core.config import from_dict
from cptflow.eval.benchmarks import BenchmarkSpec, has_split

# Sections whose dataclass builds without importing torch (the DAG is planned on a login node).
# evaluate and delta import torch and are checked when their jobs start.
SECTIONS = {
    "ingest": ("cptflow.data.ingest", "IngestConfig"),
    "clean": ("cptflow.data.clean_config", "CleanConfig"),
    "dedup": ("cptflow.data.minhash", "DedupConfig"),
    "decontaminate": ("cptflow.data.contamination", "DecontaminateConfig"),
    "pii": ("cptflow.data.pii", "PiiConfig"),
    "shards": ("cptflow.data.shards", "ShardsConfig"),
    "vocab": ("cptflow.tokenizer.vocab_config", "VocabConfig"),
    "pack": ("cptflow.pack.pack_config", "PackConfig"),
    "train": ("cptflow.train.config", "TrainConfig"),
    "sft": ("cptflow.sft.config", "SftConfig"),
}


def locate(path: str, basedir: str | os.PathLike[str]) -> str | None:
    """``path`` as given if it exists, else under ``basedir``; None if neither exists."""
    if os.path.exists(path):
        return path
    if not os.path.isabs(path) and os.path.exists(os.path.join(basedir, path)):
        return os.path.join(basedir, path)
    return None


def _missing(path: str, what: str) -> str:
    return f"{what} {path!r} does not exist (looked in the working directory {os.getcwd()} and the repository)"


def check_sections(config: Mapping[str, Any]) -> list[str]:
    problems = []
    for section, (module, name) in SECTIONS.items():
        if section not in config:
            continue
        cls = getattr(importlib.import_module(module), name)
        try:
            from_dict(cls, config[section], section)
        except (ValueError, TypeError) as e:
            msg = str(e)
            problems.append(msg if msg.startswith(section) else f"{section}: {msg}")
    return problems


def check_benchmarks(config: Mapping[str, Any], basedir: str) -> list[str]:
    problems = []
    names: list[str] = []
    for i, b in enumerate(config.get("benchmarks") or []):
        key = f"benchmarks[{i}] ({b.get('name')})"
        if b.get("name") in names:
            problems.append(f"{key}.name: {b['name']!r} is used twice")
        names.append(b.get("name"))
        path = locate(b["path"], basedir)
        if path is None:
            problems.append(f"{key}.path: " + _missing(b["path"], "benchmark folder"))
            continue
        splits = [("eval_split", b.get("eval_split", "val"))]
        if b.get("shots", 5) > 0:
            splits.append(("dev_split", b.get("dev_split", "dev")))
        try:
            spec = from_dict(BenchmarkSpec, {**b, "path": path}, key)
        except (ValueError, TypeError) as e:
            problems.append(str(e))
            continue
        for field, split in splits:
            if not has_split(spec, split):  # a <split>/ folder, or (C3, LogiQA) files named after the split
                need = f" (shots: {b.get('shots', 5)} takes the examples from it)" if field == "dev_split" else ""
                problems.append(f"{key}.{field}: no split {split!r} in {path!r} (layout {spec.layout}){need}")
    chosen = (config.get("decontaminate") or {}).get("benchmarks") or []
    unknown = [n for n in chosen if isinstance(n, str) and n not in names]
    if unknown:
        problems.append(f"decontaminate.benchmarks: unknown benchmark name(s) {unknown}; "
                        f"the benchmarks list has {sorted(n for n in names if n)}")
    return problems


def check_paths(config: Mapping[str, Any], basedir: str) -> list[str]:
    problems = []
    for lang, path in sorted((config.get("heldout") or {}).items()):
        if path and (found := locate(path, basedir)) is None:
            problems.append(f"heldout.{lang}: " + _missing(path, "held-out file"))
        elif path and not os.path.isfile(found):
            problems.append(f"heldout.{lang}: {path!r} is not a file (JSONL with a \"text\" field)")
    train = config.get("train") or {}
    entries = [("train.deepspeed", train.get("deepspeed"))]
    entries += [(f"train.stages[{i}].deepspeed", s.get("deepspeed")) for i, s in enumerate(train.get("stages") or [])]
    for key, path in entries:
        if path and locate(path, basedir) is None:
            problems.append(f"{key}: " + _missing(path, "DeepSpeed config"))
    pinned = (config.get("vocab") or {}).get("tokenizer")
    if pinned and (found := locate(pinned, basedir)) is None:
        problems.append("vocab.tokenizer: " + _missing(pinned, "tokenizer folder"))
    elif pinned and not os.path.isfile(os.path.join(found, "tokenizer.json")):
        problems.append(f"vocab.tokenizer: {pinned!r} has no tokenizer.json (give a folder a vocab stage wrote)")
    base = config.get("base_model") or {}
    if not base.get("path") and "bootstrap" in base:
        boot = base.get("bootstrap") or {}
        tok = boot.get("tokenizer")
        if tok and locate(tok, basedir) is None:
            problems.append("base_model.bootstrap.tokenizer: " + _missing(tok, "tokenizer folder"))
        for pat in boot.get("train_text") or []:
            if not (glob.glob(pat) or (not os.path.isabs(pat) and glob.glob(os.path.join(basedir, pat)))):
                problems.append(f"base_model.bootstrap.train_text: pattern {pat!r} matches no file")
    return problems


def check_categories(config: Mapping[str, Any], categories: Collection[str]) -> list[str]:
    known = sorted(categories)
    uses: list[tuple[str, list[str]]] = [("vocab.categories", list((config.get("vocab") or {}).get("categories") or []))]
    pack = config.get("pack") or {}
    uses.append(("pack.categories", list(pack.get("categories") or {})))
    if pack.get("replay"):
        uses.append(("pack.replay.category", [pack["replay"].get("category", "en_replay")]))
    train = config.get("train") or {}
    uses.append(("train.categories", list(train.get("categories") or [])))
    for i, s in enumerate(train.get("stages") or []):
        uses.append((f"train.stages[{i}].categories", list(s.get("categories") or [])))
    return [f"{key}: unknown categor{'y' if len(bad) == 1 else 'ies'} {bad}; the sources give {known}"
            for key, names in uses if (bad := sorted(set(names) - set(known)))]


def check_sft(config: Mapping[str, Any], basedir: str) -> list[str]:
    """The SFT branch's files and names: conversation globs, a template file, a DeepSpeed json, start_from."""
    from cptflow.core.config import ConfigError
    from cptflow.sft.branch import BUILTIN_TEMPLATES, resolve_conversations
    from cptflow.train.config import stage_names

    sft = config.get("sft") or {}
    problems = []
    if sft.get("sources"):
        try:
            resolve_conversations(sft["sources"], ".", basedir)
        except ConfigError as e:
            problems.append(str(e))
    template = (sft.get("sft_pack") or {}).get("chat_template", "auto")
    if template not in BUILTIN_TEMPLATES and locate(template, basedir) is None:
        problems.append("sft.sft_pack.chat_template: " + _missing(template, "chat template file (or auto, firefly)"))
    ds = (sft.get("finetune") or {}).get("deepspeed")
    if ds and locate(ds, basedir) is None:
        problems.append("sft.finetune.deepspeed: " + _missing(ds, "DeepSpeed config"))
    start = sft.get("start_from")
    try:
        stages = stage_names(config.get("train") or {})
    except ConfigError:
        stages = None  # check_sections reports it
    if start and stages is not None and start not in stages:
        problems.append(f"sft.start_from: {start!r} is not a train stage; the stages are {stages}")
    return problems


def check_config(config: Mapping[str, Any], categories: Collection[str], basedir: str) -> list[str]:
    """Every problem of a validated run config (with defaults filled), each naming its config key."""
    return [*check_sections(config), *check_benchmarks(config, basedir), *check_paths(config, basedir),
            *check_categories(config, categories), *check_sft(config, basedir)]


def notes(config: Mapping[str, Any]) -> list[str]:
    """What an explicitly empty ``benchmarks`` / ``heldout`` turns off, for a WARNING at start."""
    out = []
    if not config.get("benchmarks"):
        out.append("benchmarks is empty: decontamination removes nothing and evaluate scores no benchmark")
    if not any((config.get("heldout") or {}).values()):
        out.append("heldout names no file: no tokenizer compression table and no bits per character")
    return out
