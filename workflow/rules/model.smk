# Model stages: the demo's bootstrapped base, base_model (intake: every later stage reads its checked
# copy, never the user's path) and init_model, the base resized to the expanded vocabulary with its new
# rows initialised. Memory, threads and time come from the size of the model a job reads
# (model_resources in common.smk -> cptflow.model.sizing).


rule bootstrap:
    # A tiny LLaMA pre-trained briefly on English: the demo's stand-in for an English-centric base.
    input:
        tokenizer=rules.base_tokenizer.output.tokenizer,
        text=lambda wc: repo_glob(config["base_model"]["bootstrap"]["train_text"]),
    output:
        model=directory(f"{MODEL}/bootstrap"),
        stats=f"{MODEL}/bootstrap.stats.json",
    params:
        version=stage_version("cptflow.model.bootstrap"),
        cfg=lambda wc: json.dumps(
            with_run_seed({k: v for k, v in config["base_model"]["bootstrap"].items() if k not in ("tokenizer", "train_text")}),
            sort_keys=True,
        ),
    log:
        f"{LOGS}/bootstrap/bootstrap.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.model.bootstrap --tokenizer {input.tokenizer:q} --train-text {input.text:q}"
        " --output-dir {output.model:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule base_model:
    # Intake: a Hugging Face directory or GGUF file (base_model.path), or the bootstrapped demo base.
    input:
        source=lambda wc: base_model_source(),
    output:
        model=directory(f"{MODEL}/base"),
        stats=f"{MODEL}/base.stats.json",
    params:
        version=stage_version("cptflow.model.base_model"),
        cfg=lambda wc: json.dumps({"dtype": config["base_model"]["dtype"]}),
    log:
        f"{LOGS}/base_model/base_model.log",
    threads: model_resources("base_model", "source", "threads")
    resources:
        mem_mb=model_resources("base_model", "source", "mem_mb"),
        runtime=model_resources("base_model", "source", "runtime"),
    conda:
        ENV
    shell:
        "python -m cptflow.model.base_model --source {input.source:q} --output-dir {output.model:q}"
        " --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule init_model:
    input:
        base=rules.base_model.output.model,
        tokenizer=rules.vocab.output.tokenizer,
    output:
        model=directory(f"{MODEL}/init"),
        stats=f"{MODEL}/init.stats.json",
    params:
        version=stage_version("cptflow.model.init_model"),
        cfg=lambda wc: stage_params("init_model"),
    log:
        f"{LOGS}/init_model/init_model.log",
    threads: model_resources("init_model", "base", "threads")
    resources:
        mem_mb=model_resources("init_model", "base", "mem_mb"),
        runtime=model_resources("init_model", "base", "runtime"),
    conda:
        ENV
    shell:
        "python -m cptflow.model.init_model --base-model {input.base:q} --tokenizer {input.tokenizer:q}"
        " --output-dir {output.model:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"
