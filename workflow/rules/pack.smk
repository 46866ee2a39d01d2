# Pack: the run's tokenizer reduced once to what tokenization needs (pack_encoder: its Rust backend and
# special ids, so no per-file job imports transformers); each input file's data shard tokenized and
# spliced into fixed-length rows by its own job (pack_shard, so the work spreads over a cluster and a
# new file packs only itself); then one cheap global step (pack) that mixes the rows into buckets by
# category weight and replay share, as an index over the shards: no token is copied.


rule pack_encoder:
    input:
        tokenizer=rules.vocab.output.tokenizer,
    output:
        encoder=directory(f"{RUN}/pack/encoder"),
        stats=f"{RUN}/pack/encoder.stats.json",
    params:
        version=stage_version("cptflow.pack.encoder"),
        cfg=lambda wc: pack_params("encoder"),
    log:
        f"{LOGS}/pack/encoder.log",
    benchmark:
        f"{BENCH}/pack/encoder.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.pack.encoder --tokenizer {input.tokenizer:q} --output-dir {output.encoder:q}"
        " --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule pack_shard:
    input:
        encoder=rules.pack_encoder.output.encoder,
        shard=rules.shards.output.shard,
    output:
        shard=directory(f"{RUN}/pack/shards/{{source}}/{{part}}"),
        stats=f"{RUN}/pack/shards/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.pack.pack_shard"),
        # Only the keys the rows depend on: a new weight or seed re-indexes, it does not re-tokenize.
        cfg=lambda wc: pack_params("shard"),
        category=lambda wc: input_file(wc).category,
    log:
        f"{LOGS}/pack_shard/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/pack_shard/{{source}}/{{part}}.tsv"
    threads: 2
    resources:
        # One batch of pack.batch_docs documents at a time, whatever the file's size.
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.pack.pack_shard --encoder {input.encoder:q} --input {input.shard:q}"
        " --category {params.category} --threads {threads} --output-dir {output.shard:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule pack:
    input:
        # After the clusters checkpoint, so files whose documents did not change keep their shards.
        shards=lambda wc: after_clusters_all(per_file(f"{RUN}/pack/shards/{{source}}/{{part}}")),
    output:
        data=directory(f"{RUN}/pack/data"),
        counts=f"{RUN}/pack/counts.json",
        stats=f"{RUN}/pack/pack.stats.json",
    params:
        version=stage_version("cptflow.pack.pack"),
        cfg=lambda wc: pack_params("layout"),
    log:
        f"{LOGS}/pack/pack.log",
    benchmark:
        f"{BENCH}/pack/pack.tsv"
    threads: 1
    resources:
        # About 56 bytes per sample (tokens / max_length), measured: 10^11 tokens of 2048 are 2.7 GB.
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.pack.pack --shards {input.shards:q} --output-dir {output.data:q}"
        " --counts {output.counts:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"
