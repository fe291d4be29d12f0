# Stage "probe_heads": rank every attention head of the base Med-LVLM by its attention on the image
# (and inside the weak label); and the demo's stand-in base model, pre-trained by a rule of its own.


rule demo_lvlm:
    input:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
        root=dataset_root,
    output:
        model=directory("models/demo_lvlm/{ds}"),
    params:
        architecture=json.dumps(MODEL.get("demo", {}).get("architecture", {}), sort_keys=True),
        training=json.dumps(MODEL.get("demo", {}).get("training", {}), sort_keys=True),
        pretrain=json.dumps(MODEL.get("demo", {}).get("pretrain") or {}, sort_keys=True),
        seed=MODEL.get("demo", {}).get("seed", 0),
    log:
        "logs/demo_lvlm/{ds}.log",
    benchmark:
        "benchmarks/demo_lvlm/{ds}.tsv"
    conda:
        ENV
    # Ahead of the SAM shards: with its own pre-training set it is the demo's longest job and
    # needs no weak labels, so on 2 cores it runs beside them rather than after them
    priority: 20
    resources:
        mem_mb=4000,
    shell:
        "a3tune demo_lvlm --samples {input.samples:q} --images {input.images:q} --root {input.root:q}"
        " --architecture {params.architecture:q} --training {params.training:q} --pretrain {params.pretrain:q}"
        " --seed {params.seed:q}"
        " --out {output.model:q} > {log:q} 2>&1"


rule probe_heads:
    input:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
        labels="labels/{ds}/labels.parquet",
        store="labels/{ds}/labels.zarr",
        root=dataset_root,
        model=base_model,
    output:
        heads=f"probe/{MODEL_NAME}/{{ds}}/heads.parquet",
        figure=report(
            f"results/probe/{MODEL_NAME}/{{ds}}/heads.png",
            caption="../report/probe_heads.rst",
            category="Head probe",
            subcategory="{ds}",
        ),
    params:
        model=model_spec,
        labels=lambda wildcards: f"labels/{wildcards.ds}",
        split=PROBE.get("split", "train"),
        n_samples=PROBE.get("n_samples", 64),
        batch_size=PROBE.get("batch_size", 4),
        top_k=PROBE.get("top_k", 128),
        rank_by=PROBE.get("rank_by", "score"),
        seed=PROBE.get("seed", 0),
        device=MODEL.get("device", "cpu"),
    log:
        "logs/probe_heads/{ds}.log",
    benchmark:
        "benchmarks/probe_heads/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=16000,
    shell:
        "a3tune probe_heads --model {params.model:q} --samples {input.samples:q} --images {input.images:q}"
        " --labels {params.labels:q} --root {input.root:q} --split {params.split:q}"
        " --n-samples {params.n_samples:q} --batch-size {params.batch_size:q} --top-k {params.top_k:q}"
        " --rank-by {params.rank_by:q} --seed {params.seed:q} --device {params.device:q}"
        " --out {output.heads:q} --figure {output.figure:q} > {log:q} 2>&1"
