# Stage "refine": prompt-aware weak labels (CLIP-ranked proposals projected onto the token grid),
# the demo CLIP that stands in for BiomedCLIP, and overlay PNGs for the audit.


rule demo_clip:
    input:
        root="data/{ds}/raw",
    output:
        model=directory("models/demo_clip/{ds}"),
    params:
        training=json.dumps(CLIP.get("demo", {}), sort_keys=True),
    log:
        "logs/demo_clip/{ds}.log",
    benchmark:
        "benchmarks/demo_clip/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=4000,
    shell:
        "a3tune demo_clip --phantom-root {input.root:q} --out {output.model:q} --params {params.training:q}"
        " > {log:q} 2>&1"


rule refine:
    input:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
        proposals="labels/{ds}/proposals/proposals.parquet",
        stores=expand("labels/{{ds}}/proposals/shard-{shard}.zarr", shard=range(SHARDS)),
        root=dataset_root,
        clip=clip_model,
    output:
        store=directory("labels/{ds}/labels.zarr"),
        table="labels/{ds}/labels.parquet",
    params:
        format=lambda wildcards: dataset(wildcards)["format"],
        grid=json.dumps(LABELS["grid"], sort_keys=True),
        top_k=json.dumps(LABELS["top_k"], sort_keys=True),
        min_score=LABELS.get("min_score") or "",
        device=CLIP.get("device", "cpu"),
    log:
        "logs/refine/{ds}.log",
    benchmark:
        "benchmarks/refine/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=8000,
    shell:
        "a3tune refine --samples {input.samples:q} --images {input.images:q} --proposals {input.proposals:q}"
        " --root {input.root:q} --clip {input.clip:q} --format {params.format:q} --grid {params.grid:q}"
        " --top-k {params.top_k:q} --min-score={params.min_score:q} --device {params.device:q}"
        " --store {output.store:q} --table {output.table:q} > {log:q} 2>&1"


rule label_overlays:
    input:
        table="labels/{ds}/labels.parquet",
        store="labels/{ds}/labels.zarr",
    output:
        report(
            directory("results/labels/{ds}/overlays"),
            patterns=["{name}.png"],
            caption="../report/label_overlays.rst",
            category="Weak labels",
            subcategory="{ds}",
        ),
    params:
        labels=lambda wildcards: f"labels/{wildcards.ds}",
        n=LABELS["overlays"],
    log:
        "logs/label_overlays/{ds}.log",
    benchmark:
        "benchmarks/label_overlays/{ds}.tsv"
    conda:
        ENV
    shell:
        "a3tune overlays {params.labels:q} --out {output:q} --n {params.n:q} > {log:q} 2>&1"
