# Evaluation: benchmark scoring and bits per character of every model in eval_models() -- the base and
# the output of each training stage -- one job each, then the side-by-side table with its intervals.


rule evaluate:
    wildcard_constraints:
        model="|".join(re.escape(m) for m in eval_models()),
    input:
        model=lambda wc: eval_models()[wc.model],
        benchmarks=[b["path"] for b in config["benchmarks"]],
    output:
        results=f"{RUN}/eval/{{model}}.json",
        predictions=f"{RUN}/eval/{{model}}.predictions.jsonl",
        stats=f"{RUN}/eval/{{model}}.stats.json",
    params:
        version=stage_version("cptflow.eval.evaluate"),
        cfg=lambda wc: stage_params("evaluate"),
        benchmarks=lambda wc: json.dumps(config["benchmarks"], sort_keys=True),
        heldout=lambda wc: " ".join(f"--heldout {k}={v}" for k, v in sorted(config["heldout"].items()) if v),
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    threads: model_resources("evaluate", "model", "threads")
    resources:
        mem_mb=model_resources("evaluate", "model", "mem_mb"),
        runtime=model_resources("evaluate", "model", "runtime"),
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m cptflow.eval.evaluate --model {input.model:q} --name {wildcards.model}"
        " --benchmarks-json {params.benchmarks:q} {params.heldout} --output {output.results:q}"
        " --predictions {output.predictions:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule compare:
    input:
        results=expand(f"{RUN}/eval/{{model}}.json", model=list(eval_models())),
    output:
        json=f"{RUN}/eval/compare.json",
        md=f"{RUN}/eval/compare.md",
    params:
        version=stage_version("cptflow.eval.compare"),
        cfg=lambda wc: stage_params("compare"),
    log:
        f"{LOGS}/compare/compare.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.eval.compare --results {input.results:q}"
        " --output-json {output.json:q} --output-md {output.md:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"
