# Stage "tune": one run's adapters (A3Tune, the plain-LoRA baseline or an ablation) per data set and
# seed. Checkpoints live under cache_dir, outside the outputs, so a killed job resumes on rerun.


rule tune:
    input:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
        labels="labels/{ds}/labels.parquet",
        store="labels/{ds}/labels.zarr",
        heads=f"probe/{MODEL_NAME}/{{ds}}/heads.parquet",
        root=dataset_root,
        model=base_model,
    output:
        adapter=directory("runs/{method}/{ds}/seed-{seed}/adapter"),
        log="runs/{method}/{ds}/seed-{seed}/train_log.parquet",
    params:
        model=model_spec,
        labels=lambda wildcards: f"labels/{wildcards.ds}",
        preset=tune_preset,
        overrides=json.dumps(TUNE.get("overrides", {}), sort_keys=True),
        backbone=TUNE.get("backbone", "auto"),
        run=lambda wildcards: f"runs/{wildcards.method}/{wildcards.ds}/seed-{wildcards.seed}",
        checkpoints=lambda wildcards: f"{config['cache_dir']}/tune/{wildcards.method}/{wildcards.ds}/seed-{wildcards.seed}",
        # One rank per GPU the job was given (profiles/slurm: set-resources tune gpu), or the `ranks`
        # resource on nodes without GPUs (a CPU cluster, the SLURM tests); at least one
        ranks=lambda wildcards, resources: max(int(resources.get("ranks", 0) or 0) or int(resources.get("gpu", 0) or 0), 1),
    log:
        "logs/tune/{method}/{ds}/seed-{seed}.log",
    benchmark:
        "benchmarks/tune/{method}/{ds}/seed-{seed}.tsv"
    conda:
        ENV
    resources:
        mem_mb=16000,
    shell:
        "a3tune tune --model {params.model:q} --samples {input.samples:q} --images {input.images:q}"
        " --labels {params.labels:q} --root {input.root:q} --heads {input.heads:q} --preset {params.preset:q}"
        " --method {wildcards.method:q} --overrides {params.overrides:q} --backbone {params.backbone:q}"
        " --seed {wildcards.seed:q}"
        " --checkpoints {params.checkpoints:q} --ranks {params.ranks:q} --out {params.run:q} > {log:q} 2>&1"
