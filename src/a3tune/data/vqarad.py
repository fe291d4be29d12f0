"""VQA-RAD (Lau et al., Scientific Data 2018), as published on OSF.

Layout under the data root::

    VQA_RAD Dataset Public.json               one list of records (option ``annotation``)
    VQA_RAD Image Folder/synpic54610.jpg      the images (option ``image_dir``)

A record looks like ``{"qid": 1, "phrase_type": "freeform", "image_name": "synpic54610.jpg",
"image_organ": "HEAD", "question": "...", "answer": "Yes", "answer_type": "CLOSED",
"question_type": "PRES", ...}``; answers are sometimes numbers and ``answer_type`` sometimes
carries stray spaces or odd case.

Mapping: sample id ``vqarad-<qid>``; split ``test`` when ``phrase_type`` starts with ``test``
(``test_freeform``, ``test_para``), else ``train``: the reference's split; VQA-RAD has no val
split. ``organ`` is ``image_organ`` lower-cased (``head``, ``chest``, ``abd``); ``answer_type`` is
stripped and lower-cased; ``phrase_type`` and ``question_type`` go to extra columns. Rows in error
messages are 0-based indices into the list.
"""

from __future__ import annotations

from pathlib import Path

from a3tune.data.records import RawDataset, RawSample, iter_records, join_path, load_json, take_options, text_field

DEFAULTS = {"annotation": "VQA_RAD Dataset Public.json", "image_dir": "VQA_RAD Image Folder"}


def read(root: Path, **options) -> RawDataset:
    """Read the VQA-RAD public JSON under ``root``.

    Args:
        annotation: the JSON file, relative to ``root`` (default ``VQA_RAD Dataset Public.json``).
        image_dir: the image folder, relative to ``root`` (default ``VQA_RAD Image Folder``).
    """
    opts = take_options("vqarad", options, DEFAULTS)
    name, image_dir = str(opts["annotation"]), str(opts["image_dir"])
    records = load_json(root, name, list)
    samples = []
    for row, rec in iter_records(records, name):
        qid = text_field(rec, "qid", name, row, nonempty=True)
        phrase_type = text_field(rec, "phrase_type", name, row, nonempty=True)
        organ = text_field(rec, "image_organ", name, row, required=False)
        samples.append(
            RawSample(
                sample_id=f"vqarad-{qid}",
                split="test" if phrase_type.lower().startswith("test") else "train",
                image_path=join_path(image_dir, text_field(rec, "image_name", name, row), name, row, "image_name"),
                question=text_field(rec, "question", name, row),
                answer=text_field(rec, "answer", name, row),
                answer_type=text_field(rec, "answer_type", name, row).lower(),
                task="vqa",
                organ=organ.lower() if organ else None,
                extra={
                    "phrase_type": phrase_type,
                    "question_type": text_field(rec, "question_type", name, row, required=False) or None,
                    "qid": qid,
                },
                source=(name, row),
            )
        )
    return RawDataset(files=[root / name], samples=samples)
