# cptflow: continual pre-training of a LLaMA-family model on a new language, as one Snakemake DAG.
# Thin on purpose: config, includes and the default target. Stage logic lives in src/cptflow/,
# Snakemake glue in workflow/rules/common.smk, one rule file per stage family.
from snakemake.utils import min_version

min_version("9.0")


# No `configfile:` on purpose: a base config would fill in whatever the user's config leaves out
# (its sources, benchmarks, held-out text) behind their back. The run config is the one given with
# --configfile; the schema alone supplies defaults (workflow/rules/common.smk).


# common.smk puts the interpreter running Snakemake first on PATH, so rules run its `python`.
envvars:
    "PATH",


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/pack.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/release.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),


onsuccess:
    print_funnel()
