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
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

from a3tune.models.lvlm import image_processor_for  # noqa: E402

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
        """LLaVA's preprocessing at the tower's input size with the tower's numbers, on PIL (the
        original's backend): ``pad`` is ``expand2square`` with the mean colour, then the CLIP
        processor; ``crop`` the CLIP processor alone (resize the short side, centre crop)."""
        return image_processor_for(preprocess, self.config.image_size, image_mean=self.image_mean,
                                   image_std=self.image_std, resample=self.resample)  # fmt: skip


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
