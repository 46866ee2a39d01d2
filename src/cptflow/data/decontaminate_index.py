"""Stage ``decontaminate_index``: the n-gram index of every protected benchmark question, built once.

Every input file's ``decontaminate`` job reads this one index (``cptflow.data.contamination`` has the
matching rules). Usage::

    python -m cptflow.data.decontaminate_index --params '<json>' [--benchmarks '<json>'] --output INDEX.npz --stats S.json
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import ConfigError, from_dict, load_params, to_dict
from cptflow.core.io import PathLike
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.data.contamination import DecontaminateConfig, build_index
from cptflow.data.npzio import write_npz
from cptflow.eval.benchmarks import BenchmarkSpec, Question, has_split, read_questions, subject_files

VERSION = 1
log = logging.getLogger("cptflow.data.decontaminate_index")


def resolve_benchmarks(cfg: DecontaminateConfig, specs: Sequence[dict[str, Any]]) -> list[BenchmarkSpec]:
    """The specs to protect: cfg.benchmarks entries are spec dicts or names of ``specs``; [] = all specs."""
    by_name = {s["name"]: s for s in specs}
    chosen = cfg.benchmarks or list(by_name)
    out = []
    for b in chosen:
        if isinstance(b, dict):
            out.append(from_dict(BenchmarkSpec, b, f"decontaminate.benchmarks[{b.get('name')}]"))
        elif b in by_name:
            out.append(from_dict(BenchmarkSpec, by_name[b], f"benchmarks[{b}]"))
        else:
            raise ConfigError(f"decontaminate.benchmarks: {b!r} is not a configured benchmark ({', '.join(by_name)})")
    return out


def _questions(benchmarks: Sequence[BenchmarkSpec], splits: Sequence[str]) -> Iterable[tuple[Question, str]]:
    for spec in benchmarks:
        present = [s for s in splits if has_split(spec, s)]
        if not present:
            raise ValueError(f"benchmark {spec.name}: none of the splits {list(splits)} exists under {spec.path}")
        for split in present:
            for q in read_questions(spec, split):
                yield q, spec.lang


def run_index(cfg: DecontaminateConfig, benchmarks: Sequence[BenchmarkSpec], output: PathLike,
              stats_path: PathLike) -> Stats:
    stats = Stats()
    with Timer() as t:
        if not benchmarks:
            log.warning("no benchmarks to protect: the index is empty and decontamination keeps everything")
        arrays, unprotected = build_index(_questions(benchmarks, cfg.splits), cfg, stats)
        write_npz(output, arrays)
    log.info("index: %d questions (%d by n-grams, %d whole, %d too short to protect), %d char + %d word keys",
             len(arrays["qid"]), stats["questions_ngram"], stats["questions_whole"], stats["questions_unprotected"],
             stats["keys/char"], stats["keys/word"])
    inputs = sorted({str(p) for s in benchmarks for p in _benchmark_files(s, cfg.splits)})
    write_manifest(stats_path, stage="decontaminate_index", version=VERSION,
                   params=to_dict(cfg) | {"benchmarks": [to_dict(s) for s in benchmarks]}, inputs=inputs,
                   stats=stats, seconds=t.seconds, outputs=[output], extra={"unprotected": unprotected})
    return stats


def _benchmark_files(spec: BenchmarkSpec, splits: Sequence[str]) -> list[str]:
    return [str(p) for s in splits if has_split(spec, s) for _, p in subject_files(spec, s)]


def _build(p) -> None:
    p.add_argument("--benchmarks", default="", help="JSON list of benchmark specs (or @file) that names resolve to")
    p.add_argument("--output", required=True, help="index (.npz)")
    p.add_argument("--stats", required=True)


def _run(args, params: dict[str, Any]) -> None:
    specs = load_params(args.benchmarks) if args.benchmarks else []
    if not isinstance(specs, list):
        raise ConfigError("--benchmarks must be a JSON list of benchmark specs")
    cfg = from_dict(DecontaminateConfig, params, "decontaminate")
    run_index(cfg, resolve_benchmarks(cfg, specs), args.output, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("decontaminate_index", argv, _build, _run, "Index the benchmark questions for decontamination.")


if __name__ == "__main__":
    sys.exit(main())
