# Supervised fine-tuning: an optional branch after a CPT stage, on when `sft.sources` names conversation
# files. conversations (one job per file) -> sft_pack -> finetune (launched like train) -> sft_release,
# and generate (answers of every evaluated model). The SFT model is scored by rule `evaluate` as model
# "sft" (eval_models() in common.smk). What the branch reads and passes is SFT (cptflow.sft.branch).


wildcard_constraints:
    sft_source=_alternatives(sorted({f.source for f in SFT.inputs})),
    sft_part=_alternatives(sorted({f.part for f in SFT.inputs})),


rule conversations:
    input:
        raw=lambda wc: SFT.by_key[f"{wc.sft_source}/{wc.sft_part}"].path,
        index=[rules.decontaminate_index.output.index] if SFT.decontaminate else [],
    output:
        conversations=f"{SFT_DIR}/conversations/{{sft_source}}/{{sft_part}}.jsonl",
        quarantine=f"{SFT_DIR}/conversations/{{sft_source}}/{{sft_part}}.quarantine.jsonl",
        dropped=f"{SFT_DIR}/conversations/{{sft_source}}/{{sft_part}}.dropped.jsonl",
        stats=f"{SFT_DIR}/conversations/{{sft_source}}/{{sft_part}}.stats.json",
    params:
        version=stage_version("cptflow.sft.conversations"),
        cfg=lambda wc: sft_params("conversations"),
        fmt=lambda wc: SFT.formats[wc.sft_source],
        index=lambda wc, input: f"--index {input.index}" if input.index else "",
    log:
        f"{LOGS}/conversations/{{sft_source}}/{{sft_part}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.sft.conversations --input {input.raw:q} --format {params.fmt} --source {wildcards.sft_source}"
        " --part {wildcards.sft_part} {params.index} --output {output.conversations:q}"
        " --quarantine {output.quarantine:q} --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule sft_pack:
    input:
        tokenizer=f"{RUN}/train/{SFT.start_stage}/model",
        base=base_model_dir(),  # its tokenizer's chat template: the fallback of chat_template auto
        conversations=[f"{SFT_DIR}/conversations/{f.key}.jsonl" for f in SFT.inputs],
        manifests=[f"{SFT_DIR}/conversations/{f.key}.stats.json" for f in SFT.inputs],
        template_file=[SFT.template_file] if SFT.template_file else [],
    output:
        data=directory(f"{SFT_DIR}/pack/data"),
        template=f"{SFT_DIR}/pack/chat_template.jinja",
        counts=f"{SFT_DIR}/pack/counts.json",
        stats=f"{SFT_DIR}/pack/sft_pack.stats.json",
    params:
        version=stage_version("cptflow.sft.sft_pack"),
        cfg=lambda wc: sft_params("sft_pack"),
    log:
        f"{LOGS}/sft_pack/sft_pack.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.sft.sft_pack --tokenizer {input.tokenizer:q} --base-tokenizer {input.base:q}"
        " --conversations {input.conversations:q}"
        " --output-dir {output.data:q} --template {output.template:q} --counts {output.counts:q}"
        " --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule finetune:
    # Launched like rule train (cptflow.train.launch): torchrun on one node, srun -> torchrun across
    # nodes on SLURM (profiles/slurm: set-resources for finetune as for train).
    input:
        model=f"{RUN}/train/{SFT.start_stage}/model",
        model_manifest=f"{RUN}/train/{SFT.start_stage}/train.stats.json",
        data=rules.sft_pack.output.data,
        template=rules.sft_pack.output.template,
        data_manifest=rules.sft_pack.output.stats,
    output:
        model=directory(f"{SFT_DIR}/model"),
        metrics=f"{SFT_DIR}/metrics.jsonl",
        tensorboard=directory(f"{SFT_DIR}/tensorboard"),
        stats=f"{SFT_DIR}/finetune.stats.json",
        **({"adapter": directory(f"{SFT_DIR}/adapter")} if SFT.lora else {}),
    params:
        version=stage_version("cptflow.sft.finetune"),
        cfg=lambda wc: sft_params("finetune"),
        checkpoints=f"{SFT_DIR}/checkpoints",  # not an output: a rerun resumes from it
        adapter=lambda wc, output: f"--adapter-dir {output.adapter}" if SFT.lora else "",
    log:
        f"{LOGS}/finetune/finetune.log",
    threads: 2
    resources:
        nodes=1,
        procs_per_node=1,
        # sized as a CPT stage of the same model (fp32 master weights + AdamW): what full fine-tuning needs;
        # an upper bound for LoRA, whose frozen base is held in the training precision
        mem_mb=model_resources("train", "model", "mem_mb"),
        runtime=1440,
    conda:
        ENV
    shell:
        "python -m cptflow.train.launch --module cptflow.sft.finetune --nodes {resources.nodes}"
        " --procs-per-node {resources.procs_per_node} --cpus-per-task {threads} --"
        " --model {input.model:q} --model-manifest {input.model_manifest:q} --data {input.data:q}"
        " --template {input.template:q} --data-manifest {input.data_manifest:q}"
        " --output-dir {output.model:q} {params.adapter} --checkpoint-dir {params.checkpoints:q}"
        " --metrics {output.metrics:q} --tensorboard-dir {output.tensorboard:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log-file {log:q} 2>> {log:q}"


rule sft_release:
    input:
        base=base_model_dir(),
        model=rules.finetune.output.model,
        template=rules.sft_pack.output.template,
        template_manifest=rules.sft_pack.output.stats,
        finetune_stats=rules.finetune.output.stats,
        **({"adapter": f"{SFT_DIR}/adapter"} if SFT.lora else {}),
    output:
        release=directory(f"{RUN}/release/sft"),
        stats=f"{RUN}/release/sft.stats.json",
    params:
        version=stage_version("cptflow.sft.sft_release"),
        cfg=lambda wc: stage_params("delta"),
        adapter=lambda wc, input: f"--adapter {input.adapter}" if SFT.lora else "",
    log:
        f"{LOGS}/sft_release/sft_release.log",
    threads: 1
    resources:
        mem_mb=model_resources("delta_make", "model", "mem_mb"),  # a delta and its round trip, as delta_make
        runtime=model_resources("delta_make", "model", "runtime"),
    conda:
        ENV
    shell:
        "python -m cptflow.sft.sft_release --base {input.base:q} --model {input.model:q} {params.adapter}"
        " --template {input.template:q} --template-manifest {input.template_manifest:q}"
        " --finetune-stats {input.finetune_stats:q} --output-dir {output.release:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule generate:
    input:
        models=lambda wc: list(eval_models().values()),
        manifests=lambda wc: list(model_manifests().values()),
        base=base_model_dir(),  # sizes the job: one model at a time, each the base's size (+ new vocabulary rows)
        template=rules.sft_pack.output.template,
        template_manifest=rules.sft_pack.output.stats,
    output:
        json=f"{SFT_DIR}/generations.json",
        md=f"{SFT_DIR}/generations.md",
        stats=f"{SFT_DIR}/generations.stats.json",
    params:
        version=stage_version("cptflow.sft.generate"),
        cfg=lambda wc: sft_params("generate"),
        models=lambda wc: [f"--model={n}={p}" for n, p in eval_models().items()],  # :q quotes each item
        manifests=lambda wc: [f"--manifest={n}={p}" for n, p in model_manifests().items()],
    log:
        f"{LOGS}/generate/generate.log",
    threads: 2
    resources:
        mem_mb=model_resources("evaluate", "base", "mem_mb"),  # loads a model as evaluate does (fp32 on CPU)
        runtime=60,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m cptflow.sft.generate {params.models:q} {params.manifests:q}"
        " --template {input.template:q} --template-manifest {input.template_manifest:q}"
        " --output-json {output.json:q} --output-md {output.md:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"
