"""Radiology reports in the R2Gen layout (IU-Xray, MIMIC-CXR; Chen et al., EMNLP 2020).

Layout under the data root::

    annotation.json       {"train": [...], "val": [...], "test": [...]}   (option ``annotation``)
    images/<id>/0.png     the images (option ``image_dir``)

An item looks like ``{"id": "CXR2384_IM-0942", "report": "...", "image_path":
["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}``; MIMIC-CXR items also
carry ``study_id`` and ``subject_id``.

Mapping: one sample per item, on one image: ``image_path[image_index]`` (default the first, the
frontal view the reference uses). The question is a fixed instruction (option ``instruction``), the
answer the report; ``answer_type`` and ``task`` are ``report``, ``modality`` ``X-Ray``, ``organ``
``chest``. Sample id ``r2gen-<split>-<id>``. Rows in error messages read ``<split>[<index>]``
(0-based); an item's own ``split`` field, when present, must match the list it is in.
"""

from __future__ import annotations

from pathlib import Path

from a3tune.data.records import (
    DataFormatError,
    RawDataset,
    RawSample,
    iter_records,
    join_path,
    load_json,
    take_options,
    text_field,
)

SPLITS = ("train", "val", "test")
INSTRUCTION = "Analyze the chest X-ray and generate a concise medical report."
DEFAULTS = {"annotation": "annotation.json", "image_dir": "images", "image_index": 0, "instruction": INSTRUCTION}


def read(root: Path, **options) -> RawDataset:
    """Read an R2Gen ``annotation.json`` under ``root``.

    Args:
        annotation: the JSON file, relative to ``root`` (default ``annotation.json``).
        image_dir: the image folder, relative to ``root`` (default ``images``).
        image_index: which of an item's ``image_path`` entries to use (default 0, the first).
        instruction: the question every sample asks.
    """
    opts = take_options("r2gen", options, DEFAULTS)
    name, image_dir, index = str(opts["annotation"]), str(opts["image_dir"]), opts["image_index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"r2gen: option 'image_index' must be an integer >= 0, got {index!r}")
    instruction = str(opts["instruction"]).strip()
    if not instruction:
        raise ValueError("r2gen: option 'instruction' must not be empty")

    data = load_json(root, name, dict)
    samples = []
    for split in SPLITS:
        if not isinstance(data.get(split), list):
            raise DataFormatError(name, None, split, f"must be a list of items, got {type(data.get(split)).__name__}")
        for row, rec in iter_records(data[split], name, row_format=f"{split}[{{}}]"):
            item_split = text_field(rec, "split", name, row, required=False)
            if item_split is not None and item_split != split:
                raise DataFormatError(name, row, "split", f"{item_split!r}, but the item is in the {split!r} list")
            paths = rec.get("image_path")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise DataFormatError(name, row, "image_path", "must be a list of image paths")
            if index >= len(paths):
                raise DataFormatError(name, row, "image_path", f"has {len(paths)} images; image_index is {index}")
            item_id = text_field(rec, "id", name, row, nonempty=True)
            extra = {k: text_field(rec, k, name, row, required=False) for k in ("study_id", "subject_id") if k in rec}
            samples.append(
                RawSample(
                    sample_id=f"r2gen-{split}-{item_id}",
                    split=split,
                    image_path=join_path(image_dir, paths[index].strip(), name, row, "image_path"),
                    question=instruction,
                    answer=text_field(rec, "report", name, row, nonempty=True),
                    answer_type="report",
                    task="report",
                    organ="chest",
                    modality="X-Ray",
                    extra={"report_id": item_id, **extra},
                    source=(name, row),
                )
            )
    return RawDataset(files=[root / name], samples=samples)
