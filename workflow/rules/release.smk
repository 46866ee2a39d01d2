# Release and evaluation: delta weights (checked by a real round trip), benchmark scoring of the
# base and the adapted model, the side-by-side table.


rule delta_make:
    input:
        base=base_model_dir(),
        adapted=adapted_model_dir(),
    output:
        delta=directory(f"{RUN}/release/delta"),
        stats=f"{RUN}/release/delta.stats.json",
    params:
        cfg=lambda wc: stage_params("delta"),
    log:
        f"{LOGS}/delta_make/delta_make.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.delta make --base {input.base:q} --adapted {input.adapted:q}"
        " --output-dir {output.delta:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule delta_check:
    # Apply the release delta to the base as a user would; apply fails loudly unless every file it
    # writes has the sha256 the manifest records for the adapted model. The rebuilt copy is temporary.
    input:
        base=base_model_dir(),
        delta=rules.delta_make.output.delta,
    output:
        rebuilt=temp(directory(f"{RUN}/release/roundtrip")),
        stats=f"{RUN}/release/roundtrip.stats.json",
    params:
        cfg=lambda wc: stage_params("delta"),
    log:
        f"{LOGS}/delta_check/delta_check.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m cptflow.delta apply --base {input.base:q} --delta {input.delta:q} --format cptflow"
        " --output-dir {output.rebuilt:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule evaluate:
    input:
        model=lambda wc: {"base": base_model_dir(), "adapted": adapted_model_dir()}[wc.model],
        benchmarks=[b["path"] for b in config["benchmarks"]],
    output:
        results=f"{RUN}/eval/{{model}}.json",
        predictions=f"{RUN}/eval/{{model}}.predictions.jsonl",
        stats=f"{RUN}/eval/{{model}}.stats.json",
    params:
        cfg=lambda wc: stage_params("eval"),
        benchmarks=lambda wc: json.dumps(config["benchmarks"], sort_keys=True),
        heldout=lambda wc: " ".join(f"--heldout {k}={v}" for k, v in sorted(config["heldout"].items()) if v),
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m cptflow.evaluate --model {input.model:q} --name {wildcards.model}"
        " --benchmarks-json {params.benchmarks:q} {params.heldout} --output {output.results:q}"
        " --predictions {output.predictions:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule compare:
    input:
        results=expand(f"{RUN}/eval/{{model}}.json", model=["base", "adapted"]),
    output:
        json=f"{RUN}/eval/compare.json",
        md=f"{RUN}/eval/compare.md",
    log:
        f"{LOGS}/compare/compare.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.evaluate compare --results {input.results:q}"
        " --output-json {output.json:q} --output-md {output.md:q} 2>> {log:q}"
