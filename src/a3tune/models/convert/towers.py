"""The CLIP vision towers LLaVA-Med names, and their image preprocessing.

The original code reads a tower's config and image processor by the tower's name
(``CLIPVisionConfig.from_pretrained(mm_vision_tower)``, ``CLIPImageProcessor.from_pretrained``).
Here they come from a local folder (``--vision-tower``) read the same way, or, without one, from
the built-in copies of the two towers the published checkpoints name: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from a3tune.compat import ensure_torchvision

ensure_torchvision()

from transformers import CLIPVisionConfig  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
BUILTIN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L, "image_size": 224},
}
PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class Tower:
    """A vision tower's config and the numbers of its image processor."""

    config: CLIPVisionConfig
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int
    source: str  # the folder it was read from, or "built-in:<name>"
    folder: Path | None

    def image_processor(self, preprocess: str):
        """LLaVA's preprocessing at the tower's input size, on PIL (the original's backend).

        ``pad``: ``expand2square`` with the mean colour, then the CLIP processor (whose centre crop
        is then a no-op); ``crop``: the CLIP processor (resize the short side, centre crop).
        """
        side = self.config.image_size
        geometry = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                        image_mean=list(self.image_mean), image_std=list(self.image_std), resample=self.resample,
                        do_center_crop=True)  # fmt: skip
        if preprocess == "pad":
            return LlavaImageProcessorPil(do_pad=True, **geometry)
        if preprocess == "crop":
            return CLIPImageProcessorPil(**geometry)
        raise ValueError(f"unknown preprocess {preprocess!r}")


def resolve_tower(name: str, folder: str | Path | None) -> Tower:
    """The tower named ``name`` (``mm_vision_tower``): read from ``folder`` when given, else built in."""
    if folder is not None:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--vision-tower {folder}: no config.json (a CLIP or CLIP vision model folder)")
        config = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)  # takes vision_config of a full CLIP
        processor_file = folder / "preprocessor_config.json"
        if not processor_file.is_file():
            raise FileNotFoundError(f"--vision-tower {folder}: no preprocessor_config.json")
        numbers = json.loads(processor_file.read_text())
        size = numbers.get("crop_size", numbers.get("size"))
        side = size if isinstance(size, int) else size.get("height", size.get("shortest_edge"))
        if side != config.image_size:
            raise ValueError(f"{processor_file}: input side {side} differs from the tower's image_size {config.image_size}")
        return Tower(config, tuple(numbers.get("image_mean", OPENAI_CLIP_MEAN)), tuple(numbers.get("image_std", OPENAI_CLIP_STD)),
                     int(numbers.get("resample", PIL_BICUBIC)), str(folder), folder)  # fmt: skip
    if name not in BUILTIN_TOWERS:
        raise ValueError(
            f"vision tower {name!r} has no built-in config (known: {sorted(BUILTIN_TOWERS)}); "
            "pass --vision-tower with a local copy of it"
        )
    return Tower(CLIPVisionConfig(**BUILTIN_TOWERS[name]), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_BICUBIC,
                 f"built-in:{name}", None)  # fmt: skip
