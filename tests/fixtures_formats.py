"""Tiny data sets in each published format, written to a temporary root with real image files.

Each builder writes a valid data set and returns nothing; tests that need a malformed one edit a
file afterwards with ``rewrite``. The records cover the mappings the importers must get right:
every split, CLOSED/OPEN in odd case, numeric answers, a SLAKE folder with and without mask.png,
a non-English SLAKE question, R2Gen items with two images and MIMIC-style ids.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_image(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A small random greyscale image; the format follows the suffix (.png / .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def write_pickle(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))


def slake_record(qid: int, folder: str, question: str, answer: Any, answer_type: str, lang: str = "en") -> dict:
    return {
        "img_id": int(folder.removeprefix("xmlab")), "img_name": f"{folder}/source.jpg", "question": question,
        "answer": answer, "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type,
        "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": qid,
    }  # fmt: skip


def build_slake(root: Path) -> None:
    write_image(root / "imgs/xmlab1/source.jpg", seed=1)
    write_image(root / "imgs/xmlab1/mask.png", seed=2)
    write_image(root / "imgs/xmlab2/source.jpg", size=24, seed=3)  # no mask.png
    write_json(root / "train.json", [
        slake_record(1, "xmlab1", "Is the lung healthy?", "Yes", "CLOSED"),
        slake_record(2, "xmlab1", "Which organ is abnormal?", "Lung", "OPEN"),
        slake_record(3, "xmlab1", "肺部健康吗？", "是", "CLOSED", lang="zh"),
    ])  # fmt: skip
    write_json(root / "validate.json", [slake_record(4, "xmlab2", "What modality is this?", "CT", "OPEN")])
    write_json(root / "test.json", [slake_record(5, "xmlab2", "How many lesions?", 3, "CLOSED")])


def vqarad_record(qid: int, phrase_type: str, image: str, organ: str, answer: Any, answer_type: str) -> dict:
    return {
        "qid": qid, "phrase_type": phrase_type, "image_name": image, "image_organ": organ,
        "question": f"question {qid}?", "answer": answer, "answer_type": answer_type, "question_type": "PRES",
    }  # fmt: skip


VQARAD_JSON = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"


def build_vqarad(root: Path) -> None:
    write_image(root / VQARAD_IMAGES / "synpic1.jpg", seed=4)
    write_image(root / VQARAD_IMAGES / "synpic2.jpg", seed=5)
    write_json(root / VQARAD_JSON, [
        vqarad_record(1, "freeform", "synpic1.jpg", "HEAD", "Yes", "CLOSED"),
        vqarad_record(2, "para", "synpic1.jpg", "HEAD", 3, "OPEN "),
        vqarad_record(3, "test_freeform", "synpic2.jpg", "CHEST", "No", " closed"),
        vqarad_record(4, "test_para", "synpic2.jpg", "ABD", "liver", "Open"),
    ])  # fmt: skip


def build_pathvqa(root: Path) -> None:
    for seed, split in enumerate(("train", "val", "test")):
        write_image(root / f"images/{split}/{split}_0001.jpg", seed=10 + seed)
    write_pickle(root / "qas/train/train_qa.pkl", [
        {"image": "train_0001", "question": "Is fibrosis present?", "answer": "yes"},
        {"image": "train_0001", "question": "What is present?", "answer": "fibrosis"},
    ])  # fmt: skip
    write_pickle(root / "qas/val/val_qa.pkl", [{"image": "val_0001", "question": "Is this normal?", "answer": " No."}])
    write_pickle(root / "qas/test/test_qa.pkl", [{"image": "test_0001", "question": "Where?", "answer": "in the lung"}])


def r2gen_item(item_id: str, split: str, n_images: int, **extra: Any) -> dict:
    paths = [f"{item_id}/{i}.png" for i in range(n_images)]
    return {"id": item_id, "report": f"Report of {item_id}. No acute disease.", "image_path": paths, "split": split,
            **extra}  # fmt: skip


def build_r2gen(root: Path) -> None:
    items = {
        "train": [r2gen_item("CXR1_IM-0001", "train", 2), r2gen_item("CXR2_IM-0002", "train", 1)],
        "val": [r2gen_item("CXR3_IM-0003", "val", 1)],
        "test": [r2gen_item("d0c1", "test", 1, study_id=50000001, subject_id=10000001)],
    }
    for seed, item in enumerate(i for split in items.values() for i in split):
        for rel in item["image_path"]:
            write_image(root / "images" / rel, seed=20 + seed)
    write_json(root / "annotation.json", items)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "slake": build_slake,
    "vqarad": build_vqarad,
    "pathvqa": build_pathvqa,
    "r2gen": build_r2gen,
}


def rewrite(root: Path, relative: str, mutate: Callable[[Any], Any]) -> None:
    """Load an annotation file (JSON or pickle; None if absent), apply ``mutate``, write it back.

    ``mutate`` returns the new content; bytes are written as they are (for malformed files).
    """
    path = root / relative
    load, dump = (pickle.loads, write_pickle) if path.suffix == ".pkl" else (json.loads, write_json)
    data = load(path.read_bytes()) if path.exists() else None
    new = mutate(data)
    if isinstance(new, bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(new)
    else:
        dump(path, new)
