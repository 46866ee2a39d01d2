# Data stages: raw corpus files -> clean, deduplicated, decontaminated, PII-masked parquet shards.
# Per input file: ingest, clean, signature, dedup (apply), decontaminate, pii.
# Global: bands (one job per band group), clusters (one job: union-find), decontamination index,
# shards (one job per category) and the funnel.


rule ingest:
    input:
        raw=lambda wc: input_file(wc).path,
    output:
        docs=f"{DATA}/ingest/{{source}}/{{part}}.jsonl",
        quarantine=f"{DATA}/ingest/{{source}}/{{part}}.quarantine.jsonl",
        stats=f"{DATA}/ingest/{{source}}/{{part}}.stats.json",
    params:
        cfg=lambda wc: stage_params("ingest"),
        src=lambda wc: input_file(wc),
    log:
        f"{LOGS}/ingest/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.ingest --input {input.raw:q} --output {output.docs:q}"
        " --quarantine {output.quarantine:q} --stats {output.stats:q}"
        " --source {params.src.source} --part {params.src.part} --category {params.src.category}"
        " --lang {params.src.lang} --text-field {params.src.text_field:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule clean:
    input:
        docs=rules.ingest.output.docs,
    output:
        docs=f"{DATA}/clean/{{source}}/{{part}}.jsonl",
        dropped=f"{DATA}/clean/{{source}}/{{part}}.dropped.jsonl",
        stats=f"{DATA}/clean/{{source}}/{{part}}.stats.json",
    params:
        cfg=lambda wc: stage_params("clean"),
    log:
        f"{LOGS}/clean/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.clean --input {input.docs:q} --output {output.docs:q}"
        " --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule signature:
    input:
        docs=rules.clean.output.docs,
    output:
        sig=f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz",
        stats=f"{DATA}/dedup/signatures/{{source}}/{{part}}.stats.json",
    params:
        # Only the settings a signature depends on: changing min_jaccard reruns bands, not signatures.
        cfg=lambda wc: signature_params(),
    log:
        f"{LOGS}/signature/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.dedup.signature --input {input.docs:q} --output {output.sig:q}"
        " --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule bands:
    input:
        sigs=per_file(f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz"),
    output:
        pairs=f"{DATA}/dedup/bands/group_{{group}}.npz",
        stats=f"{DATA}/dedup/bands/group_{{group}}.stats.json",
    params:
        cfg=lambda wc: stage_params("dedup"),
    log:
        f"{LOGS}/bands/group_{{group}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.dedup.bands --signatures {input.sigs:q} --group {wildcards.group}"
        " --output {output.pairs:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


checkpoint clusters:
    input:
        sigs=per_file(f"{DATA}/dedup/signatures/{{source}}/{{part}}.npz"),
        pairs=expand(
            f"{DATA}/dedup/bands/group_{{group}}.npz",
            group=range(config["dedup"]["band_groups"]),
        ),
    output:
        drops=per_file(f"{DATA}/dedup/drop/{{source}}/{{part}}.jsonl"),
        stats=f"{DATA}/dedup/clusters.stats.json",
    params:
        cfg=lambda wc: stage_params("dedup"),
    log:
        f"{LOGS}/clusters/clusters.log",
    threads: 1
    resources:
        # The one truly global step: union-find over every candidate pair of the corpus.
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.dedup.clusters --signatures {input.sigs:q} --pairs {input.pairs:q}"
        " --drop-lists {output.drops:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule dedup:
    input:
        docs=rules.clean.output.docs,
        drop=after_clusters(f"{DATA}/dedup/drop/{{source}}/{{part}}.jsonl"),
    output:
        docs=f"{DATA}/dedup/kept/{{source}}/{{part}}.jsonl",
        dropped=f"{DATA}/dedup/kept/{{source}}/{{part}}.dropped.jsonl",
        stats=f"{DATA}/dedup/kept/{{source}}/{{part}}.stats.json",
    params:
        cfg=lambda wc: stage_params("dedup"),
    log:
        f"{LOGS}/dedup/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.dedup.apply --input {input.docs:q} --drop {input.drop:q}"
        " --output {output.docs:q} --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule decontaminate_index:
    input:
        # Benchmark folders are inputs so that editing a benchmark rebuilds the index.
        benchmarks=lambda wc: [b["path"] for b in benchmarks_for(config["decontaminate"]["benchmarks"])],
    output:
        index=f"{DATA}/decontaminate/index.npz",
        stats=f"{DATA}/decontaminate/index.stats.json",
    params:
        cfg=lambda wc: stage_params("decontaminate"),
        benchmarks=lambda wc: json.dumps(benchmarks_for(config["decontaminate"]["benchmarks"]), sort_keys=True),
    log:
        f"{LOGS}/decontaminate_index/index.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        ENV
    shell:
        "python -m cptflow.decontaminate index --benchmarks {params.benchmarks:q}"
        " --output {output.index:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule decontaminate:
    input:
        docs=after_clusters(f"{DATA}/dedup/kept/{{source}}/{{part}}.jsonl"),
        index=rules.decontaminate_index.output.index,
    output:
        docs=f"{DATA}/decontaminate/{{source}}/{{part}}.jsonl",
        dropped=f"{DATA}/decontaminate/{{source}}/{{part}}.dropped.jsonl",
        stats=f"{DATA}/decontaminate/{{source}}/{{part}}.stats.json",
    params:
        cfg=lambda wc: stage_params("decontaminate"),
    log:
        f"{LOGS}/decontaminate/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.decontaminate apply --input {input.docs:q} --index {input.index:q}"
        " --output {output.docs:q} --dropped {output.dropped:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule pii:
    input:
        docs=after_clusters(f"{DATA}/decontaminate/{{source}}/{{part}}.jsonl"),
    output:
        docs=f"{DATA}/pii/{{source}}/{{part}}.jsonl",
        stats=f"{DATA}/pii/{{source}}/{{part}}.stats.json",
    params:
        cfg=lambda wc: stage_params("pii"),
    log:
        f"{LOGS}/pii/{{source}}/{{part}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.pii --input {input.docs:q} --output {output.docs:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule shards:
    input:
        docs=lambda wc: after_clusters_all(
            per_file(f"{DATA}/pii/{{source}}/{{part}}.jsonl", [f for f in INPUTS if f.category == wc.category])
        ),
    output:
        shards=directory(f"{DATA}/shards/{{category}}"),
        stats=f"{DATA}/shards/{{category}}.stats.json",
    params:
        cfg=lambda wc: stage_params("shards"),
    log:
        f"{LOGS}/shards/{{category}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "python -m cptflow.shards --category {wildcards.category} --inputs {input.docs:q}"
        " --output-dir {output.shards:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


def data_stats(wildcards=None):
    checkpoints.clusters.get()
    files = []
    for stage in ("ingest", "clean", "dedup/kept", "decontaminate", "pii"):
        files += per_file(f"{DATA}/{stage}/{{source}}/{{part}}.stats.json")
    files += expand(f"{DATA}/shards/{{category}}.stats.json", category=CATEGORIES)
    return files


rule funnel:
    input:
        stats=data_stats,
    output:
        json=f"{DATA}/funnel.json",
        md=f"{DATA}/funnel.md",
    log:
        f"{LOGS}/funnel/funnel.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.funnel --stats {input.stats:q} --output-json {output.json:q}"
        " --output-md {output.md:q} 2>> {log:q}"
