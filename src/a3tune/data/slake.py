"""SLAKE 1.0 (Liu et al., ISBI 2021), as published.

Layout under the data root::

    train.json  validate.json  test.json      -> splits train / val / test
    imgs/<folder>/source.jpg                  the image
    imgs/<folder>/mask.png                    segmentation ground truth (most folders)

Each JSON file is a list of records such as ``{"img_id": 102, "img_name": "xmlab102/source.jpg",
"question": "...", "answer": "Yes", "q_lang": "en", "location": "Lung", "modality": "CT",
"answer_type": "CLOSED", "base_type": "vqa", "content_type": "Abnormality", "qid": 11934, ...}``.

Mapping: sample id ``slake-<qid>``; image ``imgs/<img_name>``; ``gt_mask_ref`` the folder's
``mask.png`` when that file exists, else null; ``answer_type`` lower-cased; ``location`` and
``modality`` as given; SLAKE has no organ field, so ``organ`` stays null. ``content_type``,
``base_type``, ``q_lang`` and ``qid`` go to extra columns. Only questions whose ``q_lang`` is in
the ``languages`` option are kept (English by default; SLAKE also has Chinese questions).
Rows in error messages are 0-based indices into the file's list.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from a3tune.data.images import resolve_under
from a3tune.data.records import RawDataset, RawSample, iter_records, join_path, load_json, take_options, text_field

SPLIT_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
IMAGE_DIR = "imgs"
MASK_NAME = "mask.png"
DEFAULTS = {"languages": ["en"]}


def read(root: Path, **options) -> RawDataset:
    """Read the three SLAKE split files under ``root``.

    Args:
        languages: ``q_lang`` values to keep, e.g. ``["en", "zh"]`` (default ``["en"]``).
    """
    opts = take_options("slake", options, DEFAULTS)
    languages = opts["languages"]
    if isinstance(languages, str):
        languages = [languages]
    if not isinstance(languages, (list, tuple)) or not all(isinstance(x, str) for x in languages):
        raise ValueError(f"slake: option 'languages' must be a list of language codes, got {languages!r}")

    masks: dict[str, str | None] = {}  # image folder -> mask path (many questions share an image)
    files, samples = [], []
    for split, name in SPLIT_FILES.items():
        records = load_json(root, name, list)
        files.append(root / name)
        for row, rec in iter_records(records, name):
            lang = text_field(rec, "q_lang", name, row)
            if lang not in languages:
                continue
            image_path = join_path(IMAGE_DIR, text_field(rec, "img_name", name, row), name, row, "img_name")
            folder = PurePosixPath(image_path).parent.as_posix()
            if folder not in masks:
                mask = f"{folder}/{MASK_NAME}"
                masks[folder] = mask if resolve_under(root, mask).is_file() else None
            qid = text_field(rec, "qid", name, row, nonempty=True)
            samples.append(
                RawSample(
                    sample_id=f"slake-{qid}",
                    split=split,
                    image_path=image_path,
                    question=text_field(rec, "question", name, row),
                    answer=text_field(rec, "answer", name, row),
                    answer_type=text_field(rec, "answer_type", name, row).lower(),
                    task="vqa",
                    location=text_field(rec, "location", name, row, required=False) or None,
                    modality=text_field(rec, "modality", name, row, required=False) or None,
                    gt_mask_path=masks[folder],
                    extra={
                        "content_type": text_field(rec, "content_type", name, row, required=False) or None,
                        "base_type": text_field(rec, "base_type", name, row, required=False) or None,
                        "q_lang": lang,
                        "qid": qid,
                    },
                    source=(name, row),
                )
            )
    return RawDataset(files=files, samples=samples)
