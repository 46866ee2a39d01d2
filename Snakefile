# cptflow: continual pre-training of a LLaMA-family model on a new language, as one Snakemake DAG.
# Thin on purpose: config, includes and the default target. Stage logic lives in src/cptflow/,
# Snakemake glue in workflow/rules/common.smk, one rule file per stage family.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/release.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),


onsuccess:
    print_funnel()
