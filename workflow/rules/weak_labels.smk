# Stage "sam_masks": SAM proposals per image, sharded by image content hash, then gathered.


rule sam_masks:
    input:
        images="data/{ds}/images.parquet",
        root=dataset_root,
        # An input, so a missing checkpoint stops the DAG before any job runs
        checkpoint=SAM.get("checkpoint") or [],
    output:
        store=directory("labels/{ds}/proposals/shard-{shard}.zarr"),
        table="labels/{ds}/proposals/shard-{shard}.parquet",
    params:
        shards=SHARDS,
        backend=SAM["backend"],
        checkpoint=lambda wildcards, input: input.checkpoint or "",
        generator=json.dumps(SAM.get("params", {}), sort_keys=True),
        device=SAM.get("device", "cpu"),
        cache=config["cache_dir"],
    log:
        "logs/sam_masks/{ds}/shard-{shard}.log",
    benchmark:
        "benchmarks/sam_masks/{ds}/shard-{shard}.tsv"
    conda:
        ENV
    # First in the queue: the shards are the longest jobs on the way to every later stage
    priority: 10
    resources:
        mem_mb=8000,
    shell:
        "a3tune sam_masks --images {input.images:q} --root {input.root:q}"
        " --shard {wildcards.shard:q} --shards {params.shards:q}"
        " --backend {params.backend:q} --checkpoint={params.checkpoint:q} --params {params.generator:q}"
        " --device {params.device:q} --cache-dir {params.cache:q}"
        " --store {output.store:q} --table {output.table:q} > {log:q} 2>&1"


rule gather_proposals:
    input:
        tables=expand("labels/{{ds}}/proposals/shard-{shard}.parquet", shard=range(SHARDS)),
        stores=expand("labels/{{ds}}/proposals/shard-{shard}.zarr", shard=range(SHARDS)),
    output:
        "labels/{ds}/proposals/proposals.parquet",
    log:
        "logs/gather_proposals/{ds}.log",
    benchmark:
        "benchmarks/gather_proposals/{ds}.tsv"
    conda:
        ENV
    shell:
        "a3tune gather_proposals --out {output:q} {input.tables:q} > {log:q} 2>&1"
