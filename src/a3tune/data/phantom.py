"""The phantom benchmark: seeded synthetic scans with exact masks, template questions and reports.

``generate`` writes a data root that ``read`` (format ``phantom`` of the importer) turns into samples:

    images/<image_id>.png            RGB scan
    cue_shuffled/<image_id>.png      its twin with the cue at chance (train and val images only)
    masks/<image_id>/<name>.png      0/255 mask of every structure (organs, lesion_0, cyst_0, marker, ...)
    masks/<image_id>/findings.png    union of lesion and cyst masks, for report samples with findings
    phantom.json                     config, per-image structures and every sample
    provenance.json                  stage "phantom" and the config

Each image has a *target* organ and one closed question about it ("Is there a lesion in the
liver?"); with ``lesion_rate`` the target carries the lesion. Two things make looking at the wrong
place costly. The **cue**, a marker square in a fixed corner, agrees with the closed answer in a
share ``cue_agreement[split]`` of the images (0.9 in train, 0.1 in test), so a shortcut learner
fails on test. The **confuser** (share ``confuser_rate[split]``, higher in test) is a look-alike
elsewhere: in a "no" image a lesion in another organ (a model that sees any lesion says "yes"), in
a "yes" image a dark lesion-sized cyst in another organ (a model that finds any spot names the
wrong organ). Rates are quotas, not coin flips: each split has exactly round(rate x n) such images,
drawn separately among "yes" and "no" images, so a small test split still measures what it should.

Every training and validation image also has a **cue-shuffled twin**: the same scan with the marker
drawn at chance (agreement 0.5, its own quota), the only pixels that differ being the marker's. A
run tuned on the twins (method ``lora_nocue``; a sample's ``image_cue_shuffled``) learns the task
from the same images without a shortcut to take: the reference that shows the task can be solved by
looking, and how much the cue costs a run tuned on the originals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from a3tune.data.phantom_scene import MARGIN, ORGANS, SMALLEST_ROOM, Scene, bbox_xywh, draw_scene
from a3tune.data.records import DataFormatError, RawDataset, RawSample, text_field
from a3tune.io.atomic import atomic_dir
from a3tune.io.contracts import SPLITS
from a3tune.io.provenance import Provenance
from a3tune.params_fields import is_int, is_number, known_fields

log = logging.getLogger(__name__)

LOCATION, MODALITY = "abdomen", "phantom CT"
CLOSED_Q = "Is there a lesion in the {organ}?"
OPEN_Q = "Which organ contains the lesion?"
REPORT_Q = "Analyze the image and generate a concise medical report."


def _help(text: str, kind: str) -> dict[str, str]:
    return {"help": text, "kind": kind}


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Everything that decides the phantom data set; the same config gives byte-identical files."""

    seed: int = dataclasses.field(default=0, metadata=_help("seed of every random choice, 0 <= seed < 2**32", "int"))
    n_images: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 48, "val": 8, "test": 24},
        metadata=_help("images per split; a partial mapping keeps the other splits' defaults", "split_int"),
    )
    size: int = dataclasses.field(default=128, metadata=_help("side of the square images in pixels (64-1024)", "int"))
    organs: tuple[str, ...] = dataclasses.field(
        default=tuple(ORGANS), metadata=_help(f"organs drawn and asked about, at least 2 of {list(ORGANS)}", "organs")
    )
    lesion_radius: tuple[int, int] = dataclasses.field(
        default=(4, 8), metadata=_help("(min, max) lesion and cyst radius in px; an organ caps max", "int_pair")
    )
    lesion_rate: float = dataclasses.field(
        default=0.5, metadata=_help("share of images whose target organ has a lesion (closed answer yes)", "rate")
    )
    confuser_rate: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.2, "val": 0.2, "test": 0.8},
        metadata=_help("per split, share of images with a look-alike in another organ (no: lesion, yes: cyst)",
                       "split_rate"),
    )
    cue_agreement: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.9, "val": 0.9, "test": 0.1},
        metadata=_help("per split, share of images whose corner marker is shown exactly when the answer is yes",
                       "split_rate"),
    )
    report_rate: float = dataclasses.field(default=0.5, metadata=_help("share of images with a report sample", "rate"))
    noise: float = dataclasses.field(default=4.0, metadata=_help("per-pixel noise std in grey levels", "float"))
    jitter: float = dataclasses.field(default=0.02, metadata=_help("largest organ shift, fraction of size", "float"))
    marker_size: int = dataclasses.field(default=6, metadata=_help("side of the cue marker square in px", "int"))
    # Scanner realism (texture, partial volume, bias, grain). Defaults put the soft-tissue noise at
    # ~6.5 grey levels (white 4 + grain 5, about 10 HU at a 400-HU window: routine-dose abdominal CT)
    # with ~1.5 px grain, parenchymal texture, +-5% shading and edges spread over ~2 px.
    texture: float = dataclasses.field(
        default=4.0, metadata=_help("std of the fine parenchymal texture inside the body, grey levels (0-64)", "float")
    )
    bias: float = dataclasses.field(
        default=0.05, metadata=_help("amplitude of the smooth multiplicative bias field (0-0.3; 0.05 = +-5%)", "float")
    )
    grain: float = dataclasses.field(
        default=5.0, metadata=_help("std of correlated (grainy) noise on top of `noise`, grey levels (0-64)", "float")
    )
    blur: float = dataclasses.field(
        default=0.7, metadata=_help("point-spread sigma in px: partial-volume edges (0-3; masks stay exact)", "float")
    )

    def __post_init__(self) -> None:
        low, high = self.lesion_radius
        room = int(SMALLEST_ROOM * self.size) - MARGIN  # the largest radius every organ has room for
        checks = [
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            (64 <= self.size <= 1024, f"size must be in [64, 1024], got {self.size}"),
            (len(set(self.organs)) == len(self.organs) >= 2, f"organs must be 2 or more distinct names: {self.organs}"),
            (1 <= low <= high <= self.size // 8, f"lesion_radius must be 1 <= min <= max <= size/8, got {[low, high]}"),
            (low <= room, f"lesion_radius min {low} px is too large for the smallest organ at size {self.size}"),
            (0.0 <= self.noise <= 64.0, f"noise must be in [0, 64], got {self.noise}"),
            (0.0 <= self.jitter <= 0.03, f"jitter must be in [0, 0.03], got {self.jitter}"),
            (2 <= self.marker_size <= self.size // 8, f"marker_size must be in [2, size/8], got {self.marker_size}"),
            (0.0 <= self.texture <= 64.0, f"texture must be in [0, 64], got {self.texture}"),
            (0.0 <= self.bias <= 0.3, f"bias must be in [0, 0.3], got {self.bias}"),
            (0.0 <= self.grain <= 64.0, f"grain must be in [0, 64], got {self.grain}"),
            (0.0 <= self.blur <= 3.0, f"blur must be in [0, 3], got {self.blur}"),
        ]
        unknown = [o for o in self.organs if o not in ORGANS]
        checks.append((not unknown, f"unknown organs {unknown}; known: {list(ORGANS)}"))
        for name in ("lesion_rate", "report_rate"):
            checks.append((0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}"))
        for name in ("n_images", "confuser_rate", "cue_agreement"):
            value = getattr(self, name)
            checks.append((set(value) == set(SPLITS), f"{name} needs the splits {list(SPLITS)}, got {sorted(value)}"))
            bounds = (0, 100_000) if name == "n_images" else (0.0, 1.0)
            bad = {k: v for k, v in value.items() if not bounds[0] <= v <= bounds[1]}
            checks.append((not bad, f"{name} values must be in [{bounds[0]}, {bounds[1]}], got {bad}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"phantom config: {message}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> PhantomConfig:
        """Build from plain JSON values; unknown keys and wrongly typed values raise ``ValueError``."""
        fields = known_fields(cls, params, "phantom config: unknown parameter(s)")
        return cls(**{k: _coerce(k, fields[k], v) for k, v in params.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, accepted back by ``from_dict``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else value
        return out


def _coerce(name: str, field: dataclasses.Field, value: Any) -> Any:
    kind = field.metadata["kind"]

    def fail(expected: str) -> ValueError:
        return ValueError(f"phantom config: {name} must be {expected}, got {value!r}")

    if kind == "int":
        if not is_int(value):
            raise fail("an integer")
        return value
    if kind in ("float", "rate"):
        if not is_number(value):
            raise fail("a number")
        return float(value)
    if kind in ("split_int", "split_rate"):
        if not isinstance(value, dict):
            raise fail(f"a mapping of split to value ({list(SPLITS)})")
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ValueError(f"phantom config: {name} has unknown split(s) {unknown}; splits are {list(SPLITS)}")
        check = is_int if kind == "split_int" else is_number
        if not all(check(v) for v in value.values()):
            raise fail("a mapping of split to " + ("integer" if kind == "split_int" else "number"))
        merged = field.default_factory()
        merged.update({k: v if kind == "split_int" else float(v) for k, v in value.items()})
        return merged
    if kind == "int_pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_int(v) for v in value):
            raise fail("a list of two integers")
        return tuple(value)
    if kind == "organs":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise fail("a list of organ names")
        return tuple(value)
    raise AssertionError(f"no coercion for kind {kind!r}")  # a field added without a kind


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """What one image shows, decided before any pixel is drawn."""

    image_id: str
    split: str
    index: int
    target: str  # organ of the closed question
    lesion_organ: str | None  # the target (answer yes), another organ (decoy lesion) or None
    cyst_organ: str | None
    cue: bool  # the corner marker is drawn
    report: bool  # the image also gets a report sample

    @property
    def answer(self) -> str:
        return "yes" if self.lesion_organ == self.target else "no"

    @property
    def confuser(self) -> str:
        return "decoy_lesion" if self.lesion_organ not in (None, self.target) else "cyst" if self.cyst_organ else "none"


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Tagged keys: SeedSequence([a, b]) equals SeedSequence([a, b, 0]), so key lengths never vary.
    return np.random.Generator(np.random.PCG64([seed, *key]))


def _quota(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Exactly round(rate * n) True values at random places."""
    chosen = np.zeros(n, bool)
    chosen[rng.permutation(n)[: int(np.floor(rate * n + 0.5))]] = True
    return chosen


def _split_quota(rng: np.random.Generator, groups: np.ndarray, rate: float) -> np.ndarray:
    """``_quota`` applied separately inside each group (yes images, no images)."""
    chosen = np.zeros(len(groups), bool)
    for value in (True, False):
        where = np.flatnonzero(groups == value)
        chosen[where] = _quota(rng, len(where), rate)
    return chosen


def plan_split(cfg: PhantomConfig, split: str) -> list[ImagePlan]:
    """The decisions for every image of ``split``; pure and cheap (no drawing)."""
    n, code = cfg.n_images[split], SPLITS.index(split)
    rng = _rng(cfg.seed, code, 0, 0)
    targets = [cfg.organs[i % len(cfg.organs)] for i in range(n)]
    targets = [targets[i] for i in rng.permutation(n)]
    positive = _quota(rng, n, cfg.lesion_rate)
    confused = _split_quota(rng, positive, cfg.confuser_rate[split])
    agrees = _split_quota(rng, positive, cfg.cue_agreement[split])
    report = _quota(rng, n, cfg.report_rate)
    plans = []
    for i in range(n):
        others = [o for o in cfg.organs if o != targets[i]]
        other = others[int(_rng(cfg.seed, code, 1, i).integers(len(others)))]
        lesion = targets[i] if positive[i] else other if confused[i] else None
        cyst = other if positive[i] and confused[i] else None
        cue = bool(positive[i]) == bool(agrees[i])
        plans.append(ImagePlan(f"{split}_{i:04d}", split, i, targets[i], lesion, cyst, cue, bool(report[i])))
    return plans


TWIN_SPLITS = ("train", "val")


def cue_shuffled_twins(cfg: PhantomConfig, split: str, plans: list[ImagePlan]) -> list[ImagePlan]:
    """The plans of ``split`` with the cue redrawn at agreement 0.5 (own stream; the plans stay as they are)."""
    positive = np.array([p.answer == "yes" for p in plans], bool)
    agrees = _split_quota(_rng(cfg.seed, SPLITS.index(split), 3, 0), positive, 0.5)
    return [dataclasses.replace(p, cue=bool(pos) == bool(a)) for p, pos, a in zip(plans, positive, agrees)]


def draw(cfg: PhantomConfig, plan: ImagePlan) -> Scene:
    """The image and masks of one plan, from the image's own random stream."""
    return draw_scene(
        _rng(cfg.seed, SPLITS.index(plan.split), 2, plan.index),
        size=cfg.size, organs=cfg.organs, lesion_organ=plan.lesion_organ, cyst_organ=plan.cyst_organ, cue=plan.cue,
        lesion_radius=cfg.lesion_radius, noise=cfg.noise, jitter=cfg.jitter, marker_size=cfg.marker_size,
        texture=cfg.texture, bias=cfg.bias, grain=cfg.grain, blur=cfg.blur,
    )  # fmt: skip


def report_text(plan: ImagePlan, scene: Scene, cfg: PhantomConfig) -> str:
    """A short templated report: what is seen, then each finding with its organ."""
    names = [ORGANS[o].display for o in cfg.organs]
    lines = [f"Phantom CT of the abdomen showing the {', '.join(names[:-1])} and {names[-1]}."]
    middle = (cfg.lesion_radius[0] + cfg.lesion_radius[1]) / 2
    for key, what in (("lesion_0", "bright lesion"), ("cyst_0", "dark cyst")):
        if key in scene.structures:
            found = scene.structures[key]
            size = "small" if found.radius < middle else "large"
            lines.append(f"A {size} {what} in the {ORGANS[found.organ].display}.")
    lines.append("The other organs are unremarkable." if len(lines) > 1 else "No focal lesion.")
    return " ".join(lines)


def samples_for(plan: ImagePlan, scene: Scene, cfg: PhantomConfig) -> list[dict[str, Any]]:
    """The sample records of one image (closed, open when a lesion exists, report when planned)."""
    masks = f"masks/{plan.image_id}"
    base = {"image": f"images/{plan.image_id}.png", "split": plan.split, "location": LOCATION, "modality": MODALITY}
    extra = {"target": plan.target, "cue": "present" if plan.cue else "absent",
             "cue_agrees": "yes" if plan.cue == (plan.answer == "yes") else "no", "confuser": plan.confuser,
             "image_cue_shuffled": f"cue_shuffled/{plan.image_id}.png" if plan.split in TWIN_SPLITS else None}
    target = ORGANS[plan.target].display
    rows = [{"sample_id": f"{plan.image_id}_closed", **base, "question": CLOSED_Q.format(organ=target),
             "answer": plan.answer, "answer_type": "closed", "task": "vqa", "organ": target,
             "gt_mask": f"{masks}/{plan.target}.png", **extra}]
    if plan.lesion_organ is not None:
        holder = ORGANS[plan.lesion_organ].display
        rows.append({"sample_id": f"{plan.image_id}_open", **base, "question": OPEN_Q, "answer": holder,
                     "answer_type": "open", "task": "vqa", "organ": holder, "gt_mask": f"{masks}/lesion_0.png",
                     **extra})
    if plan.report:
        findings = any(s.kind in ("lesion", "cyst") for s in scene.structures.values())
        rows.append({"sample_id": f"{plan.image_id}_report", **base, "question": REPORT_Q,
                     "answer": report_text(plan, scene, cfg), "answer_type": "report", "task": "report", "organ": None,
                     "gt_mask": f"{masks}/findings.png" if findings else None, **extra})
    return rows


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")  # no text chunks or timestamps: deterministic bytes


def generate(cfg: PhantomConfig, out: str | os.PathLike) -> Path:
    """Write the whole data root ``out`` atomically; an existing ``out`` is replaced."""
    out = Path(out)
    images, samples = [], []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "cue_shuffled").mkdir()
        for split in SPLITS:
            plans = plan_split(cfg, split)
            for twin in cue_shuffled_twins(cfg, split, plans) if split in TWIN_SPLITS else []:
                _save_png(draw(cfg, twin).image, tmp / "cue_shuffled" / f"{twin.image_id}.png")
            for plan in plans:
                scene = draw(cfg, plan)
                mask_dir = tmp / "masks" / plan.image_id
                mask_dir.mkdir(parents=True)
                _save_png(scene.image, tmp / "images" / f"{plan.image_id}.png")
                structures = {}
                for name, s in scene.structures.items():
                    _save_png(s.mask.astype(np.uint8) * 255, mask_dir / f"{name}.png")
                    structures[name] = {"kind": s.kind, "bbox_xywh": bbox_xywh(s.mask), "area": int(s.mask.sum()),
                                        "mask": f"masks/{plan.image_id}/{name}.png", "organ": s.organ,
                                        "radius": s.radius}
                rows = samples_for(plan, scene, cfg)
                finding_masks = [s.mask for s in scene.structures.values() if s.kind in ("lesion", "cyst")]
                if plan.report and finding_masks:
                    _save_png(np.logical_or.reduce(finding_masks).astype(np.uint8) * 255, mask_dir / "findings.png")
                images.append({"image_id": plan.image_id, "path": f"images/{plan.image_id}.png", "split": split,
                               "target": plan.target, "answer": plan.answer, "cue": plan.cue,
                               "confuser": plan.confuser, "structures": structures})
                samples.extend(rows)
        payload = {"config": cfg.to_dict(), "images": images, "samples": samples}
        (tmp / "phantom.json").write_text(json.dumps(payload, indent=1) + "\n")
        (tmp / "provenance.json").write_text(Provenance(stage="phantom", params=cfg.to_dict()).to_json() + "\n")
    log.info("phantom: %d images, %d samples in %s", len(images), len(samples), out)
    return out


# Keys of a phantom.json sample that map onto RawSample fields; any other key becomes an extra column.
_FIELDS = {"sample_id": "sample_id", "split": "split", "image": "image_path", "question": "question",
           "answer": "answer", "answer_type": "answer_type", "task": "task", "organ": "organ",
           "location": "location", "modality": "modality", "gt_mask": "gt_mask_path"}  # fmt: skip
_OPTIONAL = {"organ", "location", "modality", "gt_mask"}


def read(root: Path, **options: Any) -> RawDataset:
    """Samples of a data root written by ``generate`` (reads ``phantom.json``; takes no options)."""
    if options:
        raise ValueError(f"the phantom reader takes no options; got {sorted(options)}")
    path = Path(root) / "phantom.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with `a3tune phantom --out {root}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, None, None, f"not valid JSON: {exc}") from None
    rows = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataFormatError(path, None, "samples", "missing or not a list")
    samples = []
    for row, record in enumerate(rows):
        if not isinstance(record, dict):
            raise DataFormatError(path, row, None, f"expected an object, got {type(record).__name__}")
        values = {a: text_field(record, k, path, row, required=k not in _OPTIONAL) for k, a in _FIELDS.items()}
        extra = {k: text_field(record, k, path, row, required=False) for k in record if k not in _FIELDS}
        samples.append(RawSample(**values, extra=extra, source=(str(path), row)))
    return RawDataset(files=[path], samples=samples)
