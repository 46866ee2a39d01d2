# Data stages: raw corpus files -> clean, deduplicated, decontaminated, PII-masked parquet shards.
# Per input file: ingest, clean, signature, dedup (apply), decontaminate, pii, shards.
# Global: bands (one job per band group x hash range), clusters (one job: union-find), the
# decontamination index and the funnel.
# Documents between stages are zstd JSONL (.jsonl.zst) and temporary (deleted once every consumer has
# run) unless keep_intermediates; what a person inspects (quarantine, dropped documents, drop lists)
# and what a rerun needs (signatures, shards) is kept.


rule ingest:
    input:
        raw=lambda wc: input_file(wc).path,
    output:
        docs=intermediate(f"{DATA}/ingest/{{source}}/{{part}}.jsonl.zst"),
        quarantine=f"{DATA}/ingest/{{source}}/{{part}}.quarantine.jsonl",
        stats=f"{DATA}/ingest/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.ingest"),
        cfg=lambda wc: stage_params("ingest"),
        src=lambda wc: input_file(wc),
    log:
        f"{LOGS}/ingest/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/ingest/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.data.ingest --input {input.raw:q} --output {output.docs:q}"
        " --quarantine {output.quarantine:q} --stats {output.stats:q}"
        " --source {params.src.source} --part {params.src.part} --category {params.src.category}"
        " --lang {params.src.lang} --text-field {params.src.text_field:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule clean:
    input:
        docs=rules.ingest.output.docs,
    output:
        docs=intermediate(f"{DATA}/clean/{{source}}/{{part}}.jsonl.zst"),
        dropped=f"{DATA}/clean/{{source}}/{{part}}.dropped.jsonl.zst",
        stats=f"{DATA}/clean/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.clean"),
        cfg=lambda wc: stage_params("clean"),
    log:
        f"{LOGS}/clean/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/clean/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.clean --input {input.docs:q} --output {output.docs:q}"
        " --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule signature:
    input:
        docs=rules.clean.output.docs,
    output:
        sig=f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz",
        stats=f"{DATA}/dedup/signatures/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.signature"),
        # Only the settings a signature depends on: changing min_jaccard reruns bands, not signatures.
        cfg=lambda wc: signature_params(),
    log:
        f"{LOGS}/signature/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/signature/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.signature --input {input.docs:q} --output {output.sig:q}"
        " --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule bands:
    input:
        sigs=per_file(f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz"),
    output:
        pairs=f"{DATA}/dedup/bands/group_{{group}}.range_{{hrange}}.npz",
        stats=f"{DATA}/dedup/bands/group_{{group}}.range_{{hrange}}.stats.json",
    params:
        version=stage_version("cptflow.data.bands"),
        cfg=lambda wc: stage_params("dedup"),
    log:
        f"{LOGS}/bands/group_{{group}}.range_{{hrange}}.log",
    benchmark:
        f"{BENCH}/bands/group_{{group}}.range_{{hrange}}.tsv"
    threads: 1
    resources:
        # ~150 bytes x documents / hash_ranges, measured (one band at a time, with the sort's temporaries;
        # one signature file mapped at a time). docs/DESIGN.md: 10^8 documents need hash_ranges 4, 10^9 38.
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.bands --signatures {input.sigs:q} --group {wildcards.group} --range {wildcards.hrange}"
        " --output {output.pairs:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


checkpoint clusters:
    input:
        sigs=per_file(f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz"),
        pairs=expand(
            f"{DATA}/dedup/bands/group_{{group}}.range_{{hrange}}.npz",
            group=range(config["dedup"]["band_groups"]),
            hrange=range(config["dedup"]["hash_ranges"]),
        ),
    output:
        drops=per_file(f"{DATA}/dedup/drop/{{source}}/{{part}}.jsonl"),
        stats=f"{DATA}/dedup/clusters.stats.json",
    params:
        version=stage_version("cptflow.data.clusters"),
        cfg=lambda wc: stage_params("dedup"),
    log:
        f"{LOGS}/clusters/clusters.log",
    benchmark:
        f"{BENCH}/clusters/clusters.tsv"
    threads: 1
    resources:
        # The one truly global step: union-find over the pairs, 4 bytes per document + 16 per edge
        # (10^9 documents: ~6 GB, docs/DESIGN.md).
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.data.clusters --signatures {input.sigs:q} --pairs {input.pairs:q}"
        " --drop-lists {output.drops:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule dedup:
    input:
        docs=rules.clean.output.docs,
        drop=after_clusters(f"{DATA}/dedup/drop/{{source}}/{{part}}.jsonl"),
    output:
        docs=intermediate(f"{DATA}/dedup/kept/{{source}}/{{part}}.jsonl.zst"),
        dropped=f"{DATA}/dedup/kept/{{source}}/{{part}}.dropped.jsonl.zst",
        stats=f"{DATA}/dedup/kept/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.dedup"),
        cfg=lambda wc: stage_params("dedup"),
        # Read to check the drop list, but not an input: clusters rewrites it on every run, and
        # depending on it would rerun every dedup job, not just those whose drop list changed.
        drop_manifest=f"{DATA}/dedup/clusters.stats.json",
    log:
        f"{LOGS}/dedup/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/dedup/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.dedup --input {input.docs:q} --drop {input.drop:q}"
        " --output {output.docs:q} --dropped {output.dropped:q} --stats {output.stats:q}"
        " --drop-manifest {params.drop_manifest:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule decontaminate_index:
    input:
        # Benchmark folders are inputs so that editing a benchmark rebuilds the index.
        benchmarks=lambda wc: [b["path"] for b in benchmarks_for(config["decontaminate"]["benchmarks"])],
    output:
        index=f"{DATA}/decontaminate/index.npz",
        stats=f"{DATA}/decontaminate/index.stats.json",
    params:
        version=stage_version("cptflow.data.decontaminate_index"),
        cfg=lambda wc: stage_params("decontaminate"),
        benchmarks=lambda wc: json.dumps(benchmarks_for(config["decontaminate"]["benchmarks"]), sort_keys=True),
    log:
        f"{LOGS}/decontaminate_index/index.log",
    benchmark:
        f"{BENCH}/decontaminate_index/index.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.data.decontaminate_index --benchmarks {params.benchmarks:q}"
        " --output {output.index:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule decontaminate:
    input:
        docs=after_clusters(f"{DATA}/dedup/kept/{{source}}/{{part}}.jsonl.zst"),
        index=rules.decontaminate_index.output.index,
    output:
        docs=intermediate(f"{DATA}/decontaminate/{{source}}/{{part}}.jsonl.zst"),
        dropped=f"{DATA}/decontaminate/{{source}}/{{part}}.dropped.jsonl.zst",
        stats=f"{DATA}/decontaminate/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.decontaminate"),
        cfg=lambda wc: stage_params("decontaminate"),
    log:
        f"{LOGS}/decontaminate/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/decontaminate/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.decontaminate --input {input.docs:q} --index {input.index:q}"
        " --output {output.docs:q} --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule pii:
    input:
        docs=after_clusters(f"{DATA}/decontaminate/{{source}}/{{part}}.jsonl.zst"),
    output:
        docs=intermediate(f"{DATA}/pii/{{source}}/{{part}}.jsonl.zst"),
        stats=f"{DATA}/pii/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.pii"),
        cfg=lambda wc: stage_params("pii"),
    log:
        f"{LOGS}/pii/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/pii/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.data.pii --input {input.docs:q} --output {output.docs:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule shards:
    input:
        docs=rules.pii.output.docs,
    output:
        shard=f"{DATA}/shards/{{source}}/{{part}}.parquet",
        stats=f"{DATA}/shards/{{source}}/{{part}}.stats.json",
    params:
        version=stage_version("cptflow.data.shards"),
        cfg=lambda wc: stage_params("shards"),
        category=lambda wc: input_file(wc).category,
    log:
        f"{LOGS}/shards/{{source}}/{{part}}.log",
    benchmark:
        f"{BENCH}/shards/{{source}}/{{part}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.data.shards --category {params.category} --input {input.docs:q}"
        " --output {output.shard:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule funnel:
    input:
        stats=data_stats,
    output:
        json=f"{DATA}/funnel.json",
        md=f"{DATA}/funnel.md",
    params:
        version=stage_version("cptflow.data.funnel"),
        temporary=" ".join([] if config["keep_intermediates"] else ["ingest", "clean", "dedup", "decontaminate", "pii"]),
    log:
        f"{LOGS}/funnel/funnel.log",
    benchmark:
        f"{BENCH}/funnel/funnel.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.data.funnel --stats {input.stats:q} --output-json {output.json:q}"
        " --output-md {output.md:q} --temporary {params.temporary} 2>> {log:q}"
