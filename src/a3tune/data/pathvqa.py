"""PathVQA (He et al., 2020), as published.

Layout under the data root::

    qas/train/train_qa.pkl  qas/val/val_qa.pkl  qas/test/test_qa.pkl    -> splits train / val / test
    images/<split>/<image>.jpg

Each split file is a pickled list of records ``{"image": "train_0422", "question": "...",
"answer": "..."}``. The same list may be given as JSON, ``qas/<split>/<split>_qa.json``; when both
exist the JSON file is read, because it cannot carry code and someone converted it on purpose.

Pickle is an untrusted format: it is read with an unpickler that refuses every global, which plain
lists, dicts and strings never need, so a pickle that would import or call anything (a payload, or
a data frame) is refused with a ``DataFormatError`` naming the file, and nothing in it runs.

Mapping: sample id ``pathvqa-<split>-<index>`` (the record's 0-based index in its split file, which
is also the row in error messages); ``answer_type`` is ``closed`` when the answer, lower-cased and
stripped of spaces and a final full stop, is ``yes`` or ``no``, else ``open``. The reference's
mapping is not published; this is the usual yes/no rule for PathVQA.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from a3tune.data.records import (
    DataFormatError,
    RawDataset,
    RawSample,
    check_top_level,
    iter_records,
    join_path,
    load_json,
    take_options,
    text_field,
)

SPLITS = ("train", "val", "test")
CLOSED_ANSWERS = ("yes", "no")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only plain lists, dicts and text")


def load_pickle(root: Path, relative: str) -> list:
    """A pickled list of records, loaded without ever importing or calling anything."""
    data = (root / relative).read_bytes()
    try:
        records = _NoGlobalsUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as exc:  # noqa: BLE001 - whatever the bytes do, the file is malformed
        message = f"not a plain pickle of records: {type(exc).__name__}: {exc}"
        raise DataFormatError(relative, None, None, message) from None
    check_top_level(records, list, relative)
    return records


def answer_type_for(answer: str) -> str:
    return "closed" if answer.lower().strip().rstrip(".").strip() in CLOSED_ANSWERS else "open"


def read(root: Path, **options) -> RawDataset:
    """Read the three PathVQA split files under ``root`` (no options)."""
    take_options("pathvqa", options, {})
    files, samples = [], []
    for split in SPLITS:
        stem = f"qas/{split}/{split}_qa"
        if (root / f"{stem}.json").is_file():
            name, records = f"{stem}.json", load_json(root, f"{stem}.json", list)
        elif (root / f"{stem}.pkl").is_file():
            name, records = f"{stem}.pkl", load_pickle(root, f"{stem}.pkl")
        else:
            raise FileNotFoundError(f"PathVQA split file {root / stem}.pkl (or .json) does not exist")
        files.append(root / name)
        for row, rec in iter_records(records, name):
            image = text_field(rec, "image", name, row, nonempty=True)
            if not image.lower().endswith(IMAGE_SUFFIXES):
                image += ".jpg"
            answer = text_field(rec, "answer", name, row)
            samples.append(
                RawSample(
                    sample_id=f"pathvqa-{split}-{row}",
                    split=split,
                    image_path=join_path(f"images/{split}", image, name, row, "image"),
                    question=text_field(rec, "question", name, row),
                    answer=answer,
                    answer_type=answer_type_for(answer),
                    task="vqa",
                    source=(name, row),
                )
            )
    return RawDataset(files=files, samples=samples)
