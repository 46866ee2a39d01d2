# The run report: markdown + plots from the stages' JSON outputs. `snakemake --report report.html`
# turns the registered artefacts (with the captions in workflow/report/) into one HTML file.


rule report:
    input:
        funnel=f"{DATA}/funnel.json",
        compression=rules.vocab.output.report_json,
        metrics=lambda wc: [f"{RUN}/train/{s}/metrics.jsonl" for s in train_stage_names()],
        compare=rules.compare.output.json,
        compare_md=rules.compare.output.md,
        delta=rules.delta_make.output.delta,
        roundtrip=rules.delta_check.output.stats,
    output:
        summary=report(
            f"{RUN}/report/summary.md", caption="../report/summary.rst", category="Summary"
        ),
        funnel=report(f"{RUN}/report/funnel.png", caption="../report/funnel.rst", category="Data"),
        training=report(f"{RUN}/report/training.png", caption="../report/training.rst", category="Training"),
        eval=report(f"{RUN}/report/eval.png", caption="../report/eval.rst", category="Evaluation"),
    params:
        metrics=lambda wc: " ".join(f"{s}={RUN}/train/{s}/metrics.jsonl" for s in train_stage_names()),
    log:
        f"{LOGS}/report/report.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.report --run-name {config[run]} --funnel {input.funnel:q}"
        " --compression {input.compression:q} --train-metrics {params.metrics}"
        " --compare {input.compare:q} --delta-manifest {input.delta:q}/manifest.json"
        " --output-dir {RUN}/report 2>> {log:q}"
