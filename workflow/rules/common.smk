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

from cptflow.core.config import ConfigError
from cptflow.core.schema import validate_with_defaults
from cptflow.core.versions import stage_version as _stage_version
from cptflow.data.sources import resolve_sources
from cptflow import preflight

if not config:
    raise ConfigError(
        "no run config: pass one with --configfile (config/config.yaml documents every key and is a "
        "template to copy; config/demo.yaml is the demo: --configfile config/demo.yaml)"
    )
config.update(validate_with_defaults(dict(config), Path(workflow.basedir) / "config" / "schema.yaml"))

RUN = f"{config['results_dir']}/{config['run']}"
DATA = f"{RUN}/data"
LOGS = f"{RUN}/logs"
BENCH = f"{RUN}/benchmarks"  # Snakemake's benchmark: per job wall time and memory (tsv)
ENV = str(Path(workflow.basedir) / "envs" / "cptflow.yaml")
SRC = Path(workflow.basedir) / "src"


def stage_version(module):
    """The stage module's VERSION, a param of its rule: bumping it reruns the stage and what follows."""
    return _stage_version(module, SRC)


def _resolve_inputs():
    # Globs are relative to the working directory; the shipped demo data is found relative to the repo.
    try:
        return resolve_sources(config["sources"], ".")
    except ValueError as here:
        try:
            return resolve_sources(config["sources"], workflow.basedir)
        except ValueError:
            raise here from None  # the working directory is where a user's paths are meant


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
if config["base_model"].get("path"):  # pkg:<module>/<file> = a model shipped inside a Python package; then
    from cptflow.model.base_check import check_source, resolve_path  # a wrong path fails now, naming the key

    config["base_model"]["path"] = repo_path(resolve_path(config["base_model"]["path"]))
    check_source(config["base_model"]["path"])
for _lang, _p in list(config["heldout"].items()):
    config["heldout"][_lang] = repo_path(_p)

# Before any data stage: vocab.method must apply to the base's tokenizer kind (cptflow.tokenizer.kind).
from cptflow.tokenizer.kind import check_vocab_method

config["vocab"]["tokenizer"] = repo_path(config["vocab"]["tokenizer"]) if config["vocab"]["tokenizer"] else ""
if not config["vocab"]["tokenizer"]:  # a pinned tokenizer is checked against the base by the vocab stage
    check_vocab_method(config["vocab"]["method"], repo_path(config["base_model"]["path"]),
                       repo_path(config["base_model"]["bootstrap"]["tokenizer"]))

INPUTS = _resolve_inputs()
BY_KEY = {f.key: f for f in INPUTS}
SOURCES = sorted({f.source for f in INPUTS})
PARTS = sorted({f.part for f in INPUTS})
CATEGORIES = sorted({f.category for f in INPUTS})

# Everything the config names, checked now rather than by the first job that needs it.
_problems = preflight.check_config(config, CATEGORIES, workflow.basedir)
if _problems:
    raise ConfigError("config has problems (each line names its key):\n  " + "\n  ".join(_problems))
for _note in preflight.notes(config):
    print(f"cptflow: WARNING: config: {_note}", file=sys.stderr)


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


wildcard_constraints:
    source=_alternatives(SOURCES),
    part=_alternatives(PARTS),
    category=_alternatives(CATEGORIES),
    group=r"\d+",
    hrange=r"\d+",


def input_file(wildcards):
    return BY_KEY[f"{wildcards.source}/{wildcards.part}"]


def per_file(pattern, files=None):
    """Expand a {source}/{part} pattern over the run's input files (or a subset)."""
    return [pattern.format(source=f.source, part=f.part) for f in (INPUTS if files is None else files)]


def intermediate(path):
    """Documents between two data stages: deleted once consumed, unless keep_intermediates (or --notemp)."""
    return path if config["keep_intermediates"] else temp(path)


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


def pack_params(kind):
    """pack_encoder ("encoder"), pack_shard ("shard") or pack ("layout") params: only the pack keys that
    rule's output depends on."""
    from cptflow.pack.pack_config import ENCODER_KEYS, LAYOUT_KEYS, SHARD_KEYS, section_params

    keys = {"encoder": ENCODER_KEYS, "shard": SHARD_KEYS, "layout": LAYOUT_KEYS}[kind]
    return json.dumps(section_params(with_run_seed(dict(config["pack"])), keys), sort_keys=True, ensure_ascii=False)


def signature_params():
    from cptflow.data.minhash import DedupConfig
    from cptflow.core.config import from_dict

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
    """Everything a full run ends with: the report (which needs every stage), the funnel, the SFT release."""
    return [f"{DATA}/funnel.md", f"{RUN}/report/summary.md"] + ([f"{RUN}/release/sft"] if SFT.enabled else [])


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


def data_stats(wildcards=None):
    checkpoints.clusters.get()
    files = []
    for stage in ("ingest", "clean", "dedup/signatures", "dedup/kept", "decontaminate", "pii", "shards"):
        files += per_file(f"{DATA}/{stage}/{{source}}/{{part}}.stats.json")
    files += [f"{RUN}/sft/conversations/{f.key}.stats.json" for f in SFT.inputs]  # the SFT conversations' stage
    return files


def vocab_train_files(wildcards):
    """The shards vocab trains on; none with a pinned tokenizer (adding data then leaves vocab alone)."""
    if config["vocab"]["tokenizer"]:
        return []
    checkpoints.clusters.get()
    cats = config["vocab"]["categories"] or sorted(
        {f.category for f in INPUTS if f.lang == config["vocab"]["lang"]}
    )
    unknown = sorted(set(cats) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"config: vocab.categories names unknown categories {unknown}; known: {CATEGORIES}")
    return per_file(f"{DATA}/shards/{{source}}/{{part}}.parquet", [f for f in INPUTS if f.category in cats])


# ---- models and training ----------------------------------------------------------------------
MODEL = f"{RUN}/model"


def train_stage_names():
    from cptflow.train.config import stage_names

    return stage_names(config["train"])


def train_params(stage):
    from cptflow.train.config import resolve_stage

    cfg = with_run_seed(resolve_stage(config["train"], stage))
    if cfg.get("deepspeed"):
        cfg["deepspeed"] = repo_path(cfg["deepspeed"])
    return json.dumps(cfg, sort_keys=True, ensure_ascii=False)


def previous_model(stage):
    names = train_stage_names()
    i = names.index(stage)
    return f"{MODEL}/init" if i == 0 else f"{RUN}/train/{names[i - 1]}/model"


def base_model_source():
    """What the base_model stage takes in: base_model.path (checked at start), or the bootstrapped model."""
    path = config["base_model"].get("path")  # already resolved (pkg:, repository-relative) above
    return path or f"{MODEL}/bootstrap"


def base_model_dir():
    """The checked base every later stage reads (the base_model stage's output), never the user's path."""
    return f"{MODEL}/base"


def model_resources(stage, key, what):
    """Resource function: `what` (mem_mb, runtime, threads) of `stage`, sized from the model at input `key`.

    Evaluated again when the job is scheduled (the input exists then); while planning (a dry run before
    the input is made) it sizes the configured base instead, or gives the overhead-only figure."""
    from cptflow.model.sizing import estimate_resources

    def fn(wildcards, input):
        ev = config["evaluate"]
        return estimate_resources(stage, input[key], base_model_source(), dtype=config["base_model"]["dtype"],
                                  gpu=ev["device"] == "cuda", batch_size=ev["batch_size"],
                                  context=ev["max_length"])[what]

    return fn


def adapted_model_dir():
    return f"{RUN}/train/{train_stage_names()[-1]}/model"


def eval_models():
    """Name -> model directory of every model the eval stage scores, in report order: the base, then the
    output of each training stage (or only the last one, compare.every_stage: false), then the SFT model
    when the branch is on. A new branch's model is one more entry here."""
    stages = train_stage_names()
    models = {"base": base_model_dir()}
    for s in stages if config["compare"]["every_stage"] else stages[-1:]:
        if s in models or s in ("compare", "sft"):
            raise ValueError(f"config: train stage name {s!r} clashes with an evaluation output name (base, compare, sft)")
        models[s] = f"{RUN}/train/{s}/model"
    if SFT.enabled:
        models["sft"] = f"{SFT_DIR}/model"
    return models


def model_manifests():
    """Name -> manifest of the stage that wrote each of eval_models() (a user's own base has none)."""
    out = {s: f"{RUN}/train/{s}/train.stats.json" for s in train_stage_names()}
    if not config["base_model"].get("path"):
        out["base"] = f"{MODEL}/base.stats.json"
    if SFT.enabled:
        out["sft"] = f"{SFT_DIR}/finetune.stats.json"
    return {name: out[name] for name in eval_models() if name in out}


# ---- supervised fine-tuning (workflow/rules/sft.smk): off unless sft.sources names files. What the branch
# reads, starts from and passes its stages is cptflow.sft.branch; this is the glue.
from cptflow.sft.branch import SftBranch

SFT = SftBranch.plan(config["sft"], train_stage_names(), ".", workflow.basedir, repo_path)
SFT_DIR = f"{RUN}/sft"


def sft_params(stage):
    return SFT.params(stage, config.get("seed"), repo_path)
