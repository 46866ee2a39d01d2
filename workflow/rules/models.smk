# Tokenizer and model preparation: the base model (given, or bootstrapped in miniature for the
# demo), vocabulary expansion, the resized model, and the packed training data.


rule base_tokenizer:
    # Only for a bootstrapped base: write the shipped SentencePiece tokenizer in the Hugging Face
    # form that reproduces sentencepiece exactly (checked on held-out text).
    input:
        tokenizer=lambda wc: repo_path(config["base_model"]["bootstrap"]["tokenizer"]),
        check=[p for p in config["heldout"].values() if p],
    output:
        tokenizer=directory(f"{MODEL}/base_tokenizer"),
        stats=f"{MODEL}/base_tokenizer.stats.json",
    log:
        f"{LOGS}/base_tokenizer/base_tokenizer.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.base_tokenizer --tokenizer {input.tokenizer:q} --check-text {input.check:q}"
        " --output-dir {output.tokenizer:q} --stats {output.stats:q} --log {log:q} 2>> {log:q}"


rule bootstrap:
    # A tiny LLaMA pre-trained briefly on English: the demo's stand-in for an English-centric base.
    input:
        tokenizer=rules.base_tokenizer.output.tokenizer,
        text=lambda wc: repo_glob(config["base_model"]["bootstrap"]["train_text"]),
    output:
        model=directory(f"{MODEL}/base"),
        stats=f"{MODEL}/base.stats.json",
    params:
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
        "python -m cptflow.bootstrap --tokenizer {input.tokenizer:q} --train-text {input.text:q}"
        " --output-dir {output.model:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


def vocab_train_files(wildcards):
    cats = config["vocab"]["categories"] or sorted(
        {f.category for f in INPUTS if f.lang == config["vocab"]["lang"]}
    )
    unknown = sorted(set(cats) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"config: vocab.categories names unknown categories {unknown}; known: {CATEGORIES}")
    return [f"{DATA}/shards/{c}" for c in cats]


rule vocab:
    input:
        base=lambda wc: base_model_dir(),
        shards=vocab_train_files,
        heldout=[p for p in config["heldout"].values() if p],
    output:
        tokenizer=directory(f"{RUN}/tokenizer"),
        report_json=f"{RUN}/tokenizer.compression.json",
        report_md=f"{RUN}/tokenizer.compression.md",
        stats=f"{RUN}/tokenizer.stats.json",
    params:
        cfg=lambda wc: stage_params("vocab"),
        heldout=lambda wc: " ".join(
            f"--heldout-{k} {v}" for k, v in sorted(config["heldout"].items()) if v
        ),
    log:
        f"{LOGS}/vocab/vocab.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.expand_vocab --base-tokenizer {input.base:q}"
        " --train-text $(find {input.shards:q} -name '*.parquet' | sort) {params.heldout}"
        " --output-dir {output.tokenizer:q} --report-json {output.report_json:q}"
        " --report-md {output.report_md:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule init_model:
    input:
        base=lambda wc: base_model_dir(),
        tokenizer=rules.vocab.output.tokenizer,
    output:
        model=directory(f"{MODEL}/init"),
        stats=f"{MODEL}/init.stats.json",
    params:
        cfg=lambda wc: stage_params("init_model"),
    log:
        f"{LOGS}/init_model/init_model.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.init_model --base-model {input.base:q} --tokenizer {input.tokenizer:q}"
        " --output-dir {output.model:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule pack:
    input:
        tokenizer=rules.vocab.output.tokenizer,
        shards=expand(f"{DATA}/shards/{{category}}", category=CATEGORIES),
    output:
        data=directory(f"{RUN}/pack/data"),
        counts=f"{RUN}/pack/counts.json",
        stats=f"{RUN}/pack/pack.stats.json",
    params:
        cfg=lambda wc: stage_params("pack"),
        shards=lambda wc: " ".join(f"{c}={DATA}/shards/{c}" for c in CATEGORIES),
    log:
        f"{LOGS}/pack/pack.log",
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.pack --tokenizer {input.tokenizer:q} --shards {params.shards} --threads {threads}"
        " --output-dir {output.data:q} --counts {output.counts:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"
