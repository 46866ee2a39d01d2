# Tokenizer stages: the base tokenizer in Hugging Face form (for a bootstrapped base), and vocabulary
# expansion with base ids kept plus its compression report.


rule base_tokenizer:
    # Only for a bootstrapped base: write the shipped SentencePiece tokenizer in the Hugging Face
    # form that reproduces sentencepiece exactly (checked on held-out text).
    input:
        tokenizer=lambda wc: repo_path(config["base_model"]["bootstrap"]["tokenizer"]),
        check=[p for p in config["heldout"].values() if p],
    output:
        tokenizer=directory(f"{MODEL}/base_tokenizer"),
        stats=f"{MODEL}/base_tokenizer.stats.json",
    params:
        version=stage_version("cptflow.tokenizer.base_tokenizer"),
    log:
        f"{LOGS}/base_tokenizer/base_tokenizer.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.tokenizer.base_tokenizer --tokenizer {input.tokenizer:q} --check-text {input.check:q}"
        " --output-dir {output.tokenizer:q} --stats {output.stats:q} --log {log:q} 2>> {log:q}"


rule vocab:
    # vocab.method picks the path by the base's tokenizer kind (checked at start, cptflow.tokenizer.kind):
    # pieces appended to a SentencePiece base, merges continued on a byte-level BPE base, or none.
    # vocab.tokenizer pins an existing tokenizer instead: no shard is an input, so new data leaves it
    # (and init_model after it) alone.
    input:
        base=lambda wc: base_model_dir(),
        shards=vocab_train_files,
        pinned=[config["vocab"]["tokenizer"]] if config["vocab"]["tokenizer"] else [],
        heldout=[p for p in config["heldout"].values() if p],
    output:
        tokenizer=directory(f"{RUN}/tokenizer"),
        report_json=f"{RUN}/tokenizer.compression.json",
        report_md=f"{RUN}/tokenizer.compression.md",
        stats=f"{RUN}/tokenizer.stats.json",
    params:
        version=stage_version("cptflow.tokenizer.vocab"),
        cfg=lambda wc: stage_params("vocab"),
        heldout=lambda wc: " ".join(
            f"--heldout-{k} {v}" for k, v in sorted(config["heldout"].items()) if v
        ),
    log:
        f"{LOGS}/vocab/vocab.log",
    benchmark:
        f"{BENCH}/vocab/vocab.tsv"
    threads: 1
    resources:
        # The sample is bounded (vocab.input_sentence_size lines, max_sample_chars characters), so this
        # does not grow with the corpus (bench/RESULTS.md, section scale).
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.tokenizer.vocab --base-tokenizer {input.base:q}"
        " --train-text {input.shards:q} {params.heldout}"
        " --output-dir {output.tokenizer:q} --report-json {output.report_json:q}"
        " --report-md {output.report_md:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"
