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
        roundtrip=rules.delta_apply.output.stats,
        # SFT: its training curve, what sft_pack kept and dropped, finetune's summary, the answers of every model
        **({"sft_metrics": rules.finetune.output.metrics, "sft_counts": rules.sft_pack.output.counts,
            "sft_stats": rules.finetune.output.stats, "sft_answers": rules.generate.output.md} if SFT.enabled else {}),
    output:
        summary=report(
            f"{RUN}/report/summary.md", caption="../report/summary.rst", category="Summary"
        ),
        funnel=report(f"{RUN}/report/funnel.png", caption="../report/funnel.rst", category="Data"),
        training=report(f"{RUN}/report/training.png", caption="../report/training.rst", category="Training"),
        eval=report(f"{RUN}/report/eval.png", caption="../report/eval.rst", category="Evaluation"),
        stages=report(f"{RUN}/report/stages.png", caption="../report/stages.rst", category="Evaluation"),
    params:
        version=stage_version("cptflow.report.report"),
        run_name=config["run"],
        output_dir=lambda wc, output: os.path.dirname(output.summary),
        metrics=lambda wc: " ".join(f"{s}={RUN}/train/{s}/metrics.jsonl" for s in train_stage_names()),
        sft=lambda wc, input: (f"sft={input.sft_metrics} --sft-counts {input.sft_counts} --sft-stats {input.sft_stats}"
                               f" --section {input.sft_answers}") if SFT.enabled else "",
    log:
        f"{LOGS}/report/report.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m cptflow.report.report --run-name {params.run_name:q} --funnel {input.funnel:q}"
        " --compression {input.compression:q} --train-metrics {params.metrics} {params.sft}"
        " --compare {input.compare:q} --delta-manifest {input.delta:q}/manifest.json"
        " --output-dir {params.output_dir:q} 2>> {log:q}"
