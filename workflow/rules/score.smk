# Stages "score" (sharded over the test split, then gathered) and "report" (the summary table and
# figures over every scored run). A run is the base model, a tuned run or a baseline on plain LoRA.


rule score:
    input:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
        labels="labels/{ds}/labels.parquet",
        store="labels/{ds}/labels.zarr",
        heads=f"probe/{MODEL_NAME}/{{ds}}/heads.parquet",
        root=dataset_root,
        model=base_model,
        adapter=run_adapter,
    output:
        "results/{run}/{ds}/shards/shard-{shard}.parquet",
    params:
        model=model_spec,
        labels=lambda wildcards: f"labels/{wildcards.ds}",
        adapter=lambda wildcards, input: input.adapter or "",
        baseline=run_baseline,
        decoding=json.dumps(SCORE.get("decoding", {}), sort_keys=True),
        split=SCORE.get("split", "test"),
        batch_size=SCORE.get("batch_size", 8),
        limit=SCORE.get("limit") or "",
        shards=SCORE_SHARDS,
    log:
        "logs/score/{run}/{ds}/shard-{shard}.log",
    benchmark:
        "benchmarks/score/{run}/{ds}/shard-{shard}.tsv"
    conda:
        ENV
    resources:
        mem_mb=16000,
    shell:
        "a3tune score --model {params.model:q} --adapter={params.adapter:q} --baseline={params.baseline:q}"
        " --samples {input.samples:q} --images {input.images:q} --labels {params.labels:q} --root {input.root:q}"
        " --heads {input.heads:q} --decoding {params.decoding:q} --split {params.split:q}"
        " --batch-size {params.batch_size:q} --limit={params.limit:q} --shard {wildcards.shard:q} --shards {params.shards:q}"
        " --out {output:q} > {log:q} 2>&1"


rule score_gather:
    input:
        tables=expand("results/{{run}}/{{ds}}/shards/shard-{shard}.parquet", shard=range(SCORE_SHARDS)),
        chexbert=[CHEXBERT[key] for key in ("checkpoint", "bert") if CHEXBERT],
    output:
        predictions="results/{run}/{ds}/predictions.parquet",
        attention="results/{run}/{ds}/attention.parquet",
        metrics="results/{run}/{ds}/metrics.json",
    params:
        out=lambda wildcards: f"results/{wildcards.run}/{wildcards.ds}",
        meteor={True: "yes", False: "no"}.get(SCORE.get("meteor"), "auto"),
        tokenizer=SCORE.get("tokenizer", "auto"),
        reference_quirks="yes" if SCORE.get("vqa", {}).get("reference_quirks", True) else "no",
        chexbert=json.dumps(CHEXBERT, sort_keys=True),
    log:
        "logs/score_gather/{run}/{ds}.log",
    benchmark:
        "benchmarks/score_gather/{run}/{ds}.tsv"
    conda:
        ENV
    shell:
        "a3tune score_gather --out {params.out:q} --meteor {params.meteor:q} --tokenizer {params.tokenizer:q}"
        " --reference-quirks {params.reference_quirks:q} --chexbert {params.chexbert:q} {input.tables:q} > {log:q} 2>&1"


rule report:
    input:
        metrics=expand("results/{run}/{ds}/metrics.json", run=score_runs(), ds=DATASETS),
        attention=expand("results/{run}/{ds}/attention.parquet", run=score_runs(), ds=DATASETS),
        predictions=expand("results/{run}/{ds}/predictions.parquet", run=score_runs(), ds=DATASETS),
        samples=expand("data/{ds}/samples.parquet", ds=DATASETS),
        images=expand("data/{ds}/images.parquet", ds=DATASETS),
    output:
        table="results/summary.parquet",
        markdown=report("results/summary.md", caption="../report/summary.rst", category="Results"),
        figures=report(
            directory("results/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Results",
        ),
    params:
        overlays=lambda wildcards: json.dumps(overlay_settings(), sort_keys=True),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        ENV
    shell:
        "a3tune report --table {output.table:q} --markdown {output.markdown:q} --figures {output.figures:q}"
        " --overlays {params.overlays:q} --samples {input.samples:q} -- {input.metrics:q} > {log:q} 2>&1"
