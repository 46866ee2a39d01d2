# Release: delta weights of the adapted model against its base, checked by a real round trip
# (delta_apply rebuilds the adapted model from base + delta as a user would).


rule delta_make:
    input:
        base=base_model_dir(),
        adapted=adapted_model_dir(),
    output:
        delta=directory(f"{RUN}/release/delta"),
        stats=f"{RUN}/release/delta.stats.json",
    params:
        version=stage_version("cptflow.release.delta_make"),
        cfg=lambda wc: stage_params("delta"),
    log:
        f"{LOGS}/delta_make/delta_make.log",
    threads: 1
    resources:
        mem_mb=model_resources("delta_make", "adapted", "mem_mb"),
        runtime=model_resources("delta_make", "adapted", "runtime"),
    conda:
        ENV
    shell:
        "python -m cptflow.release.delta_make --base {input.base:q} --adapted {input.adapted:q}"
        " --output-dir {output.delta:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"


rule delta_apply:
    # Apply the release delta to the base as a user would; apply fails loudly unless every file it
    # writes has the sha256 the manifest records for the adapted model. The rebuilt copy is temporary.
    input:
        base=base_model_dir(),
        delta=rules.delta_make.output.delta,
    output:
        rebuilt=temp(directory(f"{RUN}/release/roundtrip")),
        stats=f"{RUN}/release/roundtrip.stats.json",
    params:
        version=stage_version("cptflow.release.delta_apply"),
        cfg=lambda wc: stage_params("delta"),
    log:
        f"{LOGS}/delta_apply/delta_apply.log",
    threads: 1
    resources:
        mem_mb=model_resources("delta_apply", "base", "mem_mb"),
        runtime=model_resources("delta_apply", "base", "runtime"),
    conda:
        ENV
    shell:
        "python -m cptflow.release.delta_apply --base {input.base:q} --delta {input.delta:q} --format cptflow"
        " --output-dir {output.rebuilt:q} --stats {output.stats:q} --params {params.cfg:q} --log {log:q} 2>> {log:q}"
