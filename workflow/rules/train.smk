# Continual pre-training: one job per stage of config `train.stages`, each starting from the
# previous stage's final model (the first from init_model). Launched through cptflow.train.launch:
# torchrun --standalone on one node, srun -> torchrun across nodes on SLURM (profiles/slurm sets
# nodes/tasks/mpi/GPUs for rule `train`).


rule train:
    input:
        model=lambda wc: previous_model(wc.stage),
        data=rules.pack.output.data,
    output:
        model=directory(f"{RUN}/train/{{stage}}/model"),
        metrics=f"{RUN}/train/{{stage}}/metrics.jsonl",
        tensorboard=directory(f"{RUN}/train/{{stage}}/tensorboard"),
        stats=f"{RUN}/train/{{stage}}/train.stats.json",
    params:
        version=stage_version("cptflow.train.train"),
        cfg=lambda wc: train_params(wc.stage),
        # Not an output: Snakemake deletes a failed job's outputs, and the checkpoints are what a
        # rerun resumes from. On SLURM it must sit on a file system every node sees.
        checkpoints=lambda wc: f"{RUN}/train/{wc.stage}/checkpoints",
    log:
        f"{LOGS}/train/{{stage}}.log",
    threads: 2
    resources:
        nodes=1,
        # torchrun workers per node (gloo processes on CPU; GPUs per node on a GPU cluster).
        procs_per_node=1,
        mem_mb=model_resources("train", "model", "mem_mb"),
        runtime=1440,
    conda:
        ENV
    shell:
        "python -m cptflow.train.launch --nodes {resources.nodes} --procs-per-node {resources.procs_per_node}"
        " --cpus-per-task {threads} --"
        " --model {input.model:q} --data {input.data:q} --output-dir {output.model:q}"
        " --checkpoint-dir {params.checkpoints:q} --metrics {output.metrics:q}"
        " --tensorboard-dir {output.tensorboard:q} --stats {output.stats:q}"
        " --params {params.cfg:q} --log-file {log:q} 2>> {log:q}"
