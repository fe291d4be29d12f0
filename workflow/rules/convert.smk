# Stage "convert_model": an original LLaVA-Med checkpoint (model.source, in model.source_format)
# becomes a standard HF Llava folder once; probe, tune and score read that folder. Cached like any
# stage: it reruns only when its inputs or parameters change.


if MODEL.get("source"):

    rule convert_model:
        input:
            source=MODEL["source"],
            base=MODEL.get("base") or [],
            vision_tower=MODEL.get("vision_tower") or [],
        output:
            model=directory(CONVERTED_MODEL),
        params:
            format=MODEL.get("source_format"),
            base=lambda wildcards, input: input.base or "",
            vision_tower=lambda wildcards, input: input.vision_tower or "",
            chat_template=MODEL.get("chat_template", "vicuna_v1"),
        log:
            f"logs/convert_model/{MODEL_NAME}.log",
        benchmark:
            f"benchmarks/convert_model/{MODEL_NAME}.tsv"
        conda:
            ENV
        resources:
            # Streams one 2 GB output shard at a time: a 7B model converts in a few GB.
            mem_mb=8000,
        shell:
            "a3tune convert_model --format {params.format:q} --source {input.source:q} --base={params.base:q}"
            " --vision-tower={params.vision_tower:q} --chat-template {params.chat_template:q}"
            " --out {output.model:q} --no-progress > {log:q} 2>&1"
