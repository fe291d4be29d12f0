# Stage "data": the phantom generator and the importers into samples/images manifests.


rule phantom:
    output:
        root=directory("data/{ds}/raw"),
    params:
        generator=lambda wildcards: json.dumps(config["phantom"], sort_keys=True),
    log:
        "logs/phantom/{ds}.log",
    benchmark:
        "benchmarks/phantom/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=2000,
    shell:
        "a3tune phantom --out {output.root:q} --params {params.generator:q} > {log:q} 2>&1"


rule import_dataset:
    input:
        root=dataset_root,
    output:
        samples="data/{ds}/samples.parquet",
        images="data/{ds}/images.parquet",
    params:
        format=lambda wildcards: dataset(wildcards)["format"],
        options=dataset_options,
    log:
        "logs/import/{ds}.log",
    benchmark:
        "benchmarks/import/{ds}.tsv"
    conda:
        ENV
    resources:
        mem_mb=4000,
    shell:
        "a3tune import --format {params.format:q} --root {input.root:q} --dataset {wildcards.ds:q}"
        " --samples {output.samples:q} --images {output.images:q} --options {params.options:q}"
        " > {log:q} 2>&1"
