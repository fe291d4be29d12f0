"""The DeepSpeed configuration of A³Tune runs, built in code rather than kept as hand-edited JSON.

It mirrors the reference's v1.5 ``scripts/zero2.json`` (ZeRO stage 2, ``overlap_comm``,
``contiguous_gradients``, ``sub_group_size`` 1e9) and ``zero3.json`` (stage 3, 16-bit weights
gathered on save), with the HF-integration ``"auto"`` values replaced by the numbers they resolve to.
The optimizer (AdamW, ``torch.optim.AdamW`` as the reference's ``adamw_torch``) and the learning-rate
schedule are part of the config so that ``engine.save_checkpoint`` stores, and ``load_checkpoint``
restores, their states with the weights.

DeepSpeed's native ``WarmupCosineLR`` (linear warm-up, cosine to zero) is the schedule a run of this
config outside the Engine gets; :class:`a3tune.tune.engine.Engine` hands DeepSpeed its own
``cosine_with_warmup`` scheduler instead (DeepSpeed prefers a client scheduler over the config's), so
that the torch and DeepSpeed backends follow the very same learning-rate curve.
"""

from __future__ import annotations

from typing import Any

ZERO_STAGES = (2, 3)


def deepspeed_config(
    *,
    stage: int = 2,
    micro_batch: int,
    grad_accum: int,
    bf16: bool,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    clip: float = 1.0,
    offload: bool = False,
) -> dict[str, Any]:
    """A DeepSpeed JSON config (as a dict) for ZeRO ``stage`` 2 or 3 with AdamW and a cosine schedule.

    ``offload`` moves the optimizer state to CPU memory; it then needs DeepSpeed's compiled CPU Adam
    (``torch.optim.AdamW`` cannot run on offloaded partitions).
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed_config: ZeRO stage {stage} is not supported; choose one of {ZERO_STAGES}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"deepspeed_config: warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay, "torch_adam": not offload},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": max(1, warmup_steps),  # WarmupCosineLR rejects 0
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.0,
            },
        },
        "zero_optimization": _zero_section(stage, offload),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _zero_section(stage: int, offload: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9}
    if stage == 3:
        zero |= {
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero
