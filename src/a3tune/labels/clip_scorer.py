"""Prompt-aware refinement: rank one image's mask proposals by their CLIP similarity to a query.

The reference (method notes §2.2) scores each SAM proposal with BiomedCLIP: the visual prompt is the
**masked crop** (the working-size image times the mask, zeros outside, cropped to the mask's
bounding box), run through the model's own preprocessing; the text is the sample's query, built from
a per-data-set template; score = 100 * cos(crop, query) with both embeddings L2-normalised; the
top k proposals are kept with no threshold.

Models come only from local files, never from a model hub:

- ``load_clip(model_dir)``: an open_clip folder, the layout of the hub repository
  ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (and of ``train_demo_clip``'s output)::

      open_clip_config.json          {"model_cfg": {...}, "preprocess_cfg": {...}}
      open_clip_model.safetensors    weights (preferred), else open_clip_pytorch_model.bin
                                     (read with torch.load(weights_only=True))

  When ``model_cfg.text_cfg`` names a Hugging Face text tower (``hf_model_name``, BiomedCLIP's
  PubMedBERT), it is built from local files only (``clip_text_tower``): the tokenizer files
  (vocab.txt / tokenizer.json / tokenizer_config.json, which the BiomedCLIP repository ships) and
  the BERT's config.json, both looked up in ``text_model_dir`` (default: ``model_dir``). Without a
  config.json, PubMedBERT's names get a built-in BERT-base config sized from the checkpoint, so the
  hub folder loads as downloaded; ``ClipScorer.text_config`` says which config was used.
- ``load_clip_named(arch, checkpoint)``: any built-in open_clip architecture (``open_clip.list_models()``)
  with a local checkpoint file.

Deliberate differences from the reference: images are RGB (the reference fed OpenCV's BGR arrays to
BiomedCLIP), and the crop box is computed from the mask itself (SAM's recorded bbox is the same box).

Import cost: open_clip (and with it torchvision) is imported when a model is loaded, after
``a3tune.compat.ensure_torchvision()``; the crop, template and selection helpers need only numpy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from a3tune.labels.clip_text_tower import HF_CONFIG_NAME, HF_TOKENIZER_NAMES, LocalTextTower, local_text_tower  # noqa: F401

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
# Weight files of a local open_clip folder, in order of preference.
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# ---------------------------------------------------------------------------------------------------
# Query templates (method notes §2.2; the typos "imgaing" are the reference's and are kept)

# Per data set format: the template for a location containing "chest", one containing "abd", and
# any other location. {loc} is the location as the reference read it, {question} the question.
QUERY_TEMPLATES: dict[str, dict[str, str]] = {
    "slake": {  # by `location` ("Abdomen", "Chest_heart", "Lung", ...)
        "chest": "Medical image of {loc} and lungs. {question}",
        "abd": "Medical imgaing of abdomen.{question}",
        "other": "Medical image of {loc}.{question}",
    },
    "vqarad": {  # by `image_organ` (HEAD / CHEST / ABD; the importer stores it lower-cased in `organ`)
        "chest": "Medical image of {loc} and lungs. {question}",
        "abd": "Medical imgaing of abdomen CT.{question}",
        "other": "Medical image of {loc}.{question}",
    },
    "pathvqa": {"other": "Medical image of pathology.{question}"},
    # IU-Xray and MIMIC-CXR reports: one constant query, whatever the instruction.
    "r2gen": {"other": "Medical image of lungs and chest X-ray."},
    # Phantom (ours): the location sentence, then the question, e.g. "Medical image of abdomen. Is
    # there a lesion in the liver?". The demo CLIP is trained on exactly these strings.
    "phantom": {"other": "Medical image of {loc}. {question}"},
}
# Without a location (a record that lacks it), the query is the bare question, as the reference
# does for OmniMedVQA.
NO_LOCATION_TEMPLATE = "{question}"


def build_query(dataset_format: str, sample: Mapping[str, Any]) -> str:
    """The reference's CLIP query for one sample (a samples.parquet row as a mapping).

    Args:
        dataset_format: the data set's importer format (slake, vqarad, pathvqa, r2gen, phantom).
        sample: the row; uses ``question``, and ``location`` (SLAKE, phantom) or ``organ`` (VQA-RAD,
            where it holds ``image_organ`` lower-cased; the query uses it upper-cased, as published).
    """
    templates = QUERY_TEMPLATES.get(dataset_format)
    if templates is None:
        raise ValueError(f"no query template for data set format {dataset_format!r}; known: {sorted(QUERY_TEMPLATES)}")
    question = sample.get("question") or ""
    if dataset_format == "vqarad":
        loc = sample.get("organ")
        loc = loc.upper() if loc else loc
    else:
        loc = sample.get("location")
    template = templates["other"]
    if "{loc}" in template or len(templates) > 1:
        if not loc:
            return NO_LOCATION_TEMPLATE.format(question=question)
        low = loc.lower()
        template = templates.get("chest" if "chest" in low else "abd" if "abd" in low else "other", template)
    return template.format(loc=loc, question=question)


# ---------------------------------------------------------------------------------------------------
# Masked crops and selection (pure numpy)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight bounding box (x, y, w, h) of a 2-D mask, or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def masked_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The reference's visual prompt: ``image * mask`` cropped to the mask's bounding box.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool.

    Returns:
        (h, w, 3) uint8 with every pixel outside the mask zero, or None for an empty mask.
    """
    box = mask_bbox(mask)
    if box is None:
        return None
    x, y, w, h = box
    window = mask[y : y + h, x : x + w]
    return np.where(window[..., None], image[y : y + h, x : x + w], 0).astype(np.uint8)


def select_top_k(scores: np.ndarray, k: int, *, min_score: float | None = None) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first; ties keep their input order.

    No threshold by default (the reference keeps the top k whatever their score); ``min_score``
    drops scores below it. Non-finite scores (an empty mask scores -inf) are never selected.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores)
    if min_score is not None:
        keep &= scores >= min_score
    candidates = np.flatnonzero(keep)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    return order[:k].astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# The scorer


@dataclasses.dataclass(eq=False)
class ClipScorer:
    """A CLIP model with its preprocessing and tokenizer, scoring masked crops against queries.

    Args:
        model: an open_clip CLIP / CustomTextCLIP in eval mode.
        preprocess: the model's inference transform (PIL image -> (3, s, s) tensor).
        tokenizer: open_clip tokenizer (list of str -> (n, context_length) token ids).
        device: where the model runs.
        batch_size: crops per forward pass.
        source: where the model came from (for messages and provenance).
        text_config: for a Hugging Face text tower, which transformers config built it (its
            config.json, or "built-in ..." with the sizes read from the checkpoint); else "".
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64
    source: str = ""
    text_config: str = ""
    text_cache_size: int = 1024
    _text_cache: OrderedDict = dataclasses.field(default_factory=OrderedDict, repr=False)

    @torch.inference_mode()
    def encode_text(self, queries: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings (q, d) float32; repeated queries come from a small cache."""
        missing = list(dict.fromkeys(q for q in queries if q not in self._text_cache))
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = self.model.encode_text(tokens).float()
            features = features / features.norm(dim=-1, keepdim=True)
            for query, row in zip(missing, features.cpu().numpy()):
                self._text_cache[query] = row
                while len(self._text_cache) > self.text_cache_size:
                    self._text_cache.popitem(last=False)
        return np.stack([self._text_cache[q] for q in queries]) if queries else np.zeros((0, 0), np.float32)

    def crop_tensors(self, image: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray]:
        """Preprocessed masked crops of the non-empty masks, and which masks those are."""
        image, masks = _check_inputs(image, masks)
        crops, rows = [], []
        for i, mask in enumerate(masks):
            crop = masked_crop(image, mask)
            if crop is not None:
                crops.append(self.preprocess(Image.fromarray(crop)))
                rows.append(i)
        return (torch.stack(crops) if crops else None), np.asarray(rows, dtype=np.int64)

    @torch.inference_mode()
    def encode_crops(self, batch: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings (n, d) float32 of preprocessed crops, in batches."""
        out = []
        for start in range(0, len(batch), self.batch_size):
            features = self.model.encode_image(batch[start : start + self.batch_size].to(self.device)).float()
            out.append((features / features.norm(dim=-1, keepdim=True)).cpu().numpy())
        return np.concatenate(out)

    def score_queries(self, image: np.ndarray, masks: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        """Scores (q, n) float32 of every mask for every query; the crops are encoded once.

        Samples that share an image share its proposals, so the refine stage scores all of an
        image's queries in one call. An empty mask scores -inf.
        """
        batch, rows = self.crop_tensors(image, masks)
        scores = np.full((len(queries), len(masks)), -np.inf, dtype=np.float32)
        if batch is None or not queries:
            return scores
        crops = self.encode_crops(batch)
        scores[:, rows] = 100.0 * self.encode_text(queries) @ crops.T
        return scores

    def score(self, image: np.ndarray, masks: np.ndarray, query: str) -> np.ndarray:
        """Scores (n,) float32: 100 * cos(masked crop of each mask, query).

        Args:
            image: (S, S, 3) uint8 working-size image (RGB).
            masks: (n, S, S) bool proposals on the same grid.
            query: the sample's query (``build_query``).
        """
        return self.score_queries(image, masks, [query])[0]


def _check_inputs(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, masks = np.asarray(image), np.asarray(masks)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (n, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    return image, masks.astype(bool, copy=False)


# ---------------------------------------------------------------------------------------------------
# Loading from local files


def import_open_clip():
    """open_clip, imported after ``ensure_torchvision`` (it imports torchvision for its transforms)."""
    from a3tune.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    return open_clip


def find_weights(model_dir: Path) -> Path:
    """The folder's CLIP weights: open_clip_model.safetensors, else open_clip_pytorch_model.bin."""
    for name in WEIGHT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    expected = " or ".join(str(model_dir / name) for name in WEIGHT_NAMES)
    raise FileNotFoundError(f"no CLIP weights in {model_dir}: expected {expected}")


def load_clip(
    model_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    text_model_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> ClipScorer:
    """Load an open_clip model from a local folder (BiomedCLIP layout; see the module docstring).

    Args:
        model_dir: folder with open_clip_config.json and the weights.
        device: where to run the model.
        text_model_dir: folder with the Hugging Face text tower's tokenizer files and config.json
            (optional for the built-in names), for configs whose text_cfg has ``hf_model_name``;
            default ``model_dir``.
        batch_size: crops per forward pass.

    Raises:
        FileNotFoundError: naming the missing folder or file (for a text tower without config.json
            and without a built-in config, also the built-in names).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"CLIP model folder {model_dir} not found")
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (an open_clip model folder needs {CONFIG_NAME})")
    weights = find_weights(model_dir)
    config = json.loads(config_path.read_text())
    if "model_cfg" not in config:
        raise ValueError(f"{config_path} has no 'model_cfg'")
    text_cfg = dict(config["model_cfg"].get("text_cfg", {}))
    vision_cfg = dict(config["model_cfg"].get("vision_cfg", {}))
    vision_cfg["timm_model_pretrained"] = False  # never fetch timm's own weights
    tower: LocalTextTower | None = None
    with contextlib.ExitStack() as stack:
        if "hf_model_name" in text_cfg:
            # Local config and tokenizer files replace the hub names (a built-in config lives in a
            # temporary folder until the block ends); the tower's weights come from the checkpoint.
            hf_dir = Path(text_model_dir) if text_model_dir is not None else model_dir
            tower = stack.enter_context(local_text_tower(text_cfg, hf_dir, weights))
            text_cfg = tower.text_cfg
        open_clip = import_open_clip()
        # The folder's config and preprocess_cfg, with the towers' configs overridden as above; weights
        # are loaded below from the file chosen here, not from open_clip's own search of the folder
        # (so open_clip's "initialized randomly" and "skipping" messages do not apply and are dropped).
        with _drop_root_records("No pretrained weights loaded", "Potential checkpoint path"):
            model = open_clip.create_model(
                f"local-dir:{model_dir}", load_weights=False, pretrained_text=False, device="cpu",
                text_cfg=text_cfg, vision_cfg=vision_cfg,
            )  # fmt: skip
        tokenizer = tower.tokenizer() if tower else open_clip.get_tokenizer(f"local-dir:{model_dir}")
    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    scorer = _scorer(open_clip, model, tokenizer, device, batch_size, str(model_dir))
    scorer.text_config = tower.text_config if tower else ""
    log.info("loaded CLIP %s (weights %s; text config %s)", model_dir, weights.name, scorer.text_config or "open_clip's")
    return scorer


def load_clip_named(
    arch: str,
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    preprocess_cfg: Mapping[str, Any] | None = None,
    batch_size: int = 64,
) -> ClipScorer:
    """Load a built-in open_clip architecture with weights from a local checkpoint file.

    Args:
        arch: an ``open_clip.list_models()`` name with a built-in text tower (names whose text tower
            is a Hugging Face model need the hub: put them in a folder and use ``load_clip``).
        checkpoint: .safetensors, or a torch file read with ``weights_only=True``.
        device: where to run the model.
        preprocess_cfg: overrides of the default preprocessing (mean, std, resize_mode, ...).
        batch_size: crops per forward pass.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint} not found")
    open_clip = import_open_clip()
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
    hub_name = text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name")
    if hub_name:
        raise ValueError(
            f"{arch} has a Hugging Face text tower ({hub_name}), which would be fetched from the hub; "
            "put the model in a local folder and use load_clip"
        )
    model = open_clip.create_model(
        arch, pretrained=str(checkpoint), device="cpu", weights_only=True,
        force_preprocess_cfg=dict(preprocess_cfg or {}),
    )  # fmt: skip
    tokenizer = open_clip.get_tokenizer(arch)
    return _scorer(open_clip, model, tokenizer, device, batch_size, f"{arch}:{checkpoint}")


@contextlib.contextmanager
def _drop_root_records(*prefixes: str) -> Iterator[None]:
    """Drop root-logger records starting with one of ``prefixes`` (open_clip logs to the root logger)."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefixes)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _scorer(open_clip, model, tokenizer, device, batch_size, source) -> ClipScorer:
    device = torch.device(device)
    model = model.to(device).eval()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    return ClipScorer(model, preprocess, tokenizer, device=device, batch_size=batch_size, source=source)
