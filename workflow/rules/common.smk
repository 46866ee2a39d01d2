# Snakemake glue only: config validation, input-file table, path builders, params, targets.
# Anything with logic worth a test lives in src/cptflow/ and is imported.
import json
import os
import re
import sys
from pathlib import Path

# Rules call `python -m cptflow.<stage>`: make that the interpreter running Snakemake (the .venv),
# unless a conda env activated for a rule puts its own python first.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from cptflow.schema import validate_with_defaults
from cptflow.sources import resolve_sources

config.update(validate_with_defaults(dict(config), Path(workflow.basedir) / "config" / "schema.yaml"))

RUN = f"{config['results_dir']}/{config['run']}"
DATA = f"{RUN}/data"
LOGS = f"{RUN}/logs"
ENV = str(Path(workflow.basedir) / "envs" / "cptflow.yaml")


def _resolve_inputs():
    # Globs are relative to the working directory; the shipped demo data is found relative to the repo.
    try:
        return resolve_sources(config["sources"], ".")
    except ValueError:
        return resolve_sources(config["sources"], workflow.basedir)


def repo_path(path):
    """A relative path as given if it exists from the working directory, else from the repository."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(workflow.basedir, path)
    return alt if os.path.exists(alt) else path


def repo_glob(patterns):
    """Expand glob patterns from the working directory, else from the repository; sorted, unique."""
    import glob

    found = set()
    for pat in patterns:
        hits = glob.glob(pat) if os.path.isabs(pat) else glob.glob(pat) or glob.glob(os.path.join(workflow.basedir, pat))
        if not hits:
            raise ValueError(f"config: pattern {pat!r} matches no file")
        found.update(hits)
    return sorted(found)


for _b in config["benchmarks"]:
    _b["path"] = repo_path(_b["path"])
for _lang, _p in list(config["heldout"].items()):
    config["heldout"][_lang] = repo_path(_p)

INPUTS = _resolve_inputs()
BY_KEY = {f.key: f for f in INPUTS}
SOURCES = sorted({f.source for f in INPUTS})
PARTS = sorted({f.part for f in INPUTS})
CATEGORIES = sorted({f.category for f in INPUTS})


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


wildcard_constraints:
    source=_alternatives(SOURCES),
    part=_alternatives(PARTS),
    category=_alternatives(CATEGORIES),
    group=r"\d+",
    model="base|adapted",


def input_file(wildcards):
    return BY_KEY[f"{wildcards.source}/{wildcards.part}"]


def per_file(pattern, files=None):
    """Expand a {source}/{part} pattern over the run's input files (or a subset)."""
    return [pattern.format(source=f.source, part=f.part) for f in (files or INPUTS)]


def with_run_seed(section):
    """Apply the top-level `seed` (when set) to a stage section that has a seed of its own."""
    if config.get("seed") is not None and "seed" in section:
        section["seed"] = config["seed"]
    return section


def stage_params(section, **extra):
    """The JSON of one config section: a rule reruns when (and only when) its own section changes."""
    value = with_run_seed(dict(config.get(section) or {}))
    value.update(extra)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def signature_params():
    from cptflow.dedup.minhash import DedupConfig
    from cptflow.config import from_dict

    cfg = from_dict(DedupConfig, with_run_seed(dict(config["dedup"])), "dedup")
    return json.dumps(cfg.signature_params(), sort_keys=True)


def benchmarks_for(names):
    known = {b["name"]: b for b in config["benchmarks"]}
    missing = [n for n in (names or []) if n not in known]
    if missing:
        raise ValueError(f"config: decontaminate.benchmarks names unknown benchmark(s) {missing}; known: {sorted(known)}")
    return [known[n] for n in names] if names else list(known.values())


def after_clusters(pattern):
    """Input function that waits for the `clusters` checkpoint before naming its file.

    Jobs after the clusters checkpoint are evaluated only once it has run; Snakemake then skips
    every per-file job whose drop list is byte-identical to last time (it compares checksums),
    so adding one corpus file reruns that file's chain plus the global jobs, not the whole corpus.
    """

    def fn(wildcards):
        checkpoints.clusters.get()
        return pattern.format(**wildcards)

    return fn


def final_targets():
    """Everything a full run ends with: the report (which needs every stage) and the funnel."""
    return [f"{DATA}/funnel.md", f"{RUN}/report/summary.md"]


def print_funnel():
    md = Path(f"{DATA}/funnel.md")
    if md.exists():
        print(f"\nData funnel ({md}):\n\n{md.read_text(encoding='utf-8')}", file=sys.stderr)
    summary = Path(f"{RUN}/report/summary.md")
    if summary.exists():
        print(f"Report: {summary}  (HTML: snakemake --report {RUN}/report/report.html)", file=sys.stderr)
    print(f"Outputs: {Path(RUN).resolve()}  (logs: {LOGS})", file=sys.stderr)


def after_clusters_all(paths):
    """Like after_clusters, for an input function that returns a list of paths."""
    checkpoints.clusters.get()
    return paths


# ---- models and training ----------------------------------------------------------------------
MODEL = f"{RUN}/model"


def train_stage_names():
    from cptflow.train_config import stage_names

    return stage_names(config["train"])


def train_params(stage):
    from cptflow.train_config import resolve_stage

    cfg = with_run_seed(resolve_stage(config["train"], stage))
    if cfg.get("deepspeed"):
        cfg["deepspeed"] = repo_path(cfg["deepspeed"])
    return json.dumps(cfg, sort_keys=True, ensure_ascii=False)


def previous_model(stage):
    names = train_stage_names()
    i = names.index(stage)
    return f"{MODEL}/init" if i == 0 else f"{RUN}/train/{names[i - 1]}/model"


def base_model_dir():
    """The base model: a Hugging Face directory from config, or the tiny bootstrapped one."""
    path = config["base_model"].get("path")
    return repo_path(path) if path else f"{MODEL}/base"


def adapted_model_dir():
    return f"{RUN}/train/{train_stage_names()[-1]}/model"
