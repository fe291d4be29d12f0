"""The published-format readers (SLAKE, VQA-RAD, PathVQA, R2Gen) through ``import_dataset`` and the CLI.

Every test writes a tiny data set with real image files under ``tmp_path`` (tests/fixtures_formats.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shlex
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fixtures_formats import BUILDERS, VQARAD_IMAGES, VQARAD_JSON, rewrite, vqarad_record, write_image, write_json

from a3tune.cli import main
from a3tune.data.images import PathEscapeError
from a3tune.data.importer import import_dataset, read_dataset
from a3tune.data.records import DataFormatError
from a3tune.io import read_provenance
from a3tune.io.contracts import check_contract


def build(tmp_path: Path, fmt: str) -> Path:
    root = tmp_path / "root"
    BUILDERS[fmt](root)
    return root


def run_import(root: Path, fmt: str, out: Path, options: dict | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    import_dataset(fmt, root, fmt, out / "samples.parquet", out / "images.parquet", options, progress=False)
    return pl.read_parquet(out / "samples.parquet"), pl.read_parquet(out / "images.parquet")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# fmt -> (annotation files hashed into provenance, number of samples, {sample_id: expected columns})
IMPORT_CASES: dict[str, tuple[list[str], int, dict[str, dict[str, Any]]]] = {
    "slake": (["train.json", "validate.json", "test.json"], 4, {
        "slake-1": {"split": "train", "answer_type": "closed", "task": "vqa", "organ": None, "location": "Lung",
                    "modality": "CT", "gt_mask_ref": "imgs/xmlab1/mask.png", "image_id": "imgs/xmlab1/source",
                    "q_lang": "en", "content_type": "Abnormality", "qid": "1"},
        "slake-2": {"split": "train", "answer_type": "open", "answer": "Lung"},
        "slake-4": {"split": "val", "answer_type": "open", "gt_mask_ref": None, "image_id": "imgs/xmlab2/source"},
        "slake-5": {"split": "test", "answer_type": "closed", "answer": "3"},
    }),
    "vqarad": ([VQARAD_JSON], 4, {
        "vqarad-1": {"split": "train", "answer_type": "closed", "organ": "head", "gt_mask_ref": None,
                     "image_id": f"{VQARAD_IMAGES}/synpic1", "phrase_type": "freeform", "question_type": "PRES"},
        "vqarad-2": {"split": "train", "answer_type": "open", "answer": "3"},
        "vqarad-3": {"split": "test", "answer_type": "closed", "organ": "chest"},
        "vqarad-4": {"split": "test", "answer_type": "open", "organ": "abd"},
    }),
    "pathvqa": (["qas/train/train_qa.pkl", "qas/val/val_qa.pkl", "qas/test/test_qa.pkl"], 4, {
        "pathvqa-train-0": {"split": "train", "answer_type": "closed", "image_id": "images/train/train_0001"},
        "pathvqa-train-1": {"split": "train", "answer_type": "open", "answer": "fibrosis"},
        "pathvqa-val-0": {"split": "val", "answer_type": "closed", "answer": "No."},
        "pathvqa-test-0": {"split": "test", "answer_type": "open", "organ": None},
    }),
    "r2gen": (["annotation.json"], 4, {
        "r2gen-train-CXR1_IM-0001": {"split": "train", "answer_type": "report", "task": "report", "organ": "chest",
                                     "modality": "X-Ray", "image_id": "images/CXR1_IM-0001/0",
                                     "question": "Analyze the chest X-ray and generate a concise medical report.",
                                     "answer": "Report of CXR1_IM-0001. No acute disease."},
        "r2gen-val-CXR3_IM-0003": {"split": "val"},
        "r2gen-test-d0c1": {"split": "test", "study_id": "50000001", "subject_id": "10000001"},
    }),
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(IMPORT_CASES))
def test_import_writes_both_manifests(tmp_path, fmt):
    files, n_samples, expected = IMPORT_CASES[fmt]
    root = build(tmp_path, fmt)
    samples, images = run_import(root, fmt, tmp_path / "out")

    check_contract(samples, "samples")
    check_contract(images, "images")
    assert samples.height == n_samples
    assert set(samples["dataset"]) == {fmt}
    by_id = {row["sample_id"]: row for row in samples.iter_rows(named=True)}
    for sample_id, columns in expected.items():
        assert {k: by_id[sample_id][k] for k in columns} == columns, sample_id
    # every sample's image is described once, and all fixture images are fine
    assert set(samples["image_id"]) == set(images["image_id"])
    assert images["status"].to_list() == ["ok"] * images.height
    for row in images.iter_rows(named=True):
        assert row["sha256"] == sha256(root / row["path"])
        assert row["height"] in (16, 24) and row["width"] == row["height"]

    for name in ("samples.parquet", "images.parquet"):
        prov = read_provenance(tmp_path / "out" / name)
        assert prov is not None and prov.stage == "import" and prov.params["format"] == fmt
        assert prov.inputs == {f: sha256(root / f) for f in files}

    # a rerun on the same files gives bitwise-identical manifests (no timestamps anywhere)
    run_import(root, fmt, tmp_path / "again")
    for name in ("samples.parquet", "images.parquet"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_slake_languages_option(tmp_path):
    root = build(tmp_path, "slake")
    english = read_dataset("slake", root)
    both = read_dataset("slake", root, languages=["en", "zh"])
    assert "slake-3" not in {s.sample_id for s in english.samples}
    chinese = [s for s in both.samples if s.sample_id == "slake-3"]
    assert len(chinese) == 1 and chinese[0].extra["q_lang"] == "zh" and chinese[0].answer == "是"


def test_pathvqa_prefers_json_over_pickle(tmp_path):
    root = build(tmp_path, "pathvqa")
    write_json(root / "qas/val/val_qa.json", [{"image": "val_0001", "question": "Is this normal?", "answer": "yes"}])
    raw = read_dataset("pathvqa", root)
    assert root / "qas/val/val_qa.json" in raw.files and root / "qas/val/val_qa.pkl" not in raw.files
    assert [s.answer for s in raw.samples if s.split == "val"] == ["yes"]


def test_r2gen_image_index_option(tmp_path):
    root = build(tmp_path, "r2gen")
    rewrite(root, "annotation.json", lambda d: {"train": d["train"][:1], "val": [], "test": []})  # two images
    raw = read_dataset("r2gen", root, image_index=1, instruction="Describe the findings.")
    first = next(s for s in raw.samples if s.sample_id == "r2gen-train-CXR1_IM-0001")
    assert first.image_path == "images/CXR1_IM-0001/1.png" and first.question == "Describe the findings."
    with pytest.raises(DataFormatError, match=r"row train\[1\], field 'image_path'"):
        read_dataset("r2gen", build(tmp_path / "b", "r2gen"), image_index=1)


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_unknown_option_is_named(tmp_path, fmt):
    root = build(tmp_path, fmt)
    with pytest.raises(ValueError, match="'bogus_key'"):
        read_dataset(fmt, root, bogus_key=1)


@pytest.mark.parametrize(
    "fmt, options",
    [("slake", {"languages": 3}), ("r2gen", {"image_index": -1}), ("r2gen", {"image_index": "0"})],
)
def test_bad_option_values(tmp_path, fmt, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        read_dataset(fmt, build(tmp_path, fmt), **options)


def test_cli_import(tmp_path, capsys):
    root = build(tmp_path, "slake")
    out = tmp_path / "out"
    args = ["import", "--format", "slake", "--root", str(root), "--dataset", "slake-en", "--no-progress",
            "--samples", str(out / "samples.parquet"), "--images", str(out / "images.parquet")]  # fmt: skip
    assert main([*args, "--options", '{"languages": ["en", "zh"]}']) == 0
    samples = pl.read_parquet(out / "samples.parquet")
    assert samples.height == 5 and set(samples["dataset"]) == {"slake-en"}
    assert (out / "images.parquet").is_file()

    rewrite(root, "validate.json", lambda data: b'[{"qid": 4,\n  "question": }]')
    assert main([*args, "--samples", str(tmp_path / "bad.parquet")]) == 2
    err = capsys.readouterr().err
    assert "validate.json" in err and "line 2" in err
    assert not (tmp_path / "bad.parquet").exists()


def test_bad_images_are_rows_with_a_status(tmp_path):
    root = build(tmp_path, "vqarad")
    folder = root / VQARAD_IMAGES
    (folder / "corrupt.jpg").write_bytes(bytes(range(256)) * 4)
    (folder / "truncated.png").write_bytes(write_image(folder / "full.png").read_bytes()[:60])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    bad = {"corrupt.jpg": "unreadable", "truncated.png": "unreadable", "empty.jpg": "empty",
           "missing.jpg": "missing", "text.jpg": "unreadable"}  # fmt: skip
    extra = [vqarad_record(10 + i, "freeform", name, "HEAD", "Yes", "CLOSED") for i, name in enumerate(bad)]
    rewrite(root, VQARAD_JSON, lambda data: data + extra)

    samples, images = run_import(root, "vqarad", tmp_path / "out")
    assert samples.height == 4 + len(bad)  # no sample is dropped
    status = dict(zip(images["path"], images["status"], strict=True))
    for name, expected in bad.items():
        assert status.pop(f"{VQARAD_IMAGES}/{name}") == expected, name
    assert set(status.values()) == {"ok"} and len(status) == 2
    errors = images.filter(pl.col("status") != "ok")["error"]
    assert errors.null_count() == 0


def _link_outside(root: Path, link: str, target: Path) -> None:
    path = root / link
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.symlink(target, root / link)


# (fmt, how the path escapes); `outside` is a valid image next to (not under) the data root
ESCAPE_CASES = {
    "slake-dotdot": ("slake", lambda root, outside: rewrite(
        root, "test.json", lambda d: [{**d[0], "img_name": "../../outside.jpg"}])),
    "slake-symlinked-folder": ("slake", lambda root, outside: _link_outside(root, "imgs/xmlab2", outside.parent)),
    "vqarad-absolute": ("vqarad", lambda root, outside: rewrite(
        root, VQARAD_JSON, lambda d: [{**d[0], "image_name": str(outside)}])),
    "vqarad-symlink": ("vqarad", lambda root, outside: _link_outside(root, f"{VQARAD_IMAGES}/synpic2.jpg", outside)),
    "pathvqa-dotdot": ("pathvqa", lambda root, outside: rewrite(
        root, "qas/test/test_qa.pkl", lambda d: [{**d[0], "image": "../../../outside/outside"}])),
    "r2gen-dotdot": ("r2gen", lambda root, outside: rewrite(
        root, "annotation.json", lambda d: {**d, "val": [{**d["val"][0], "image_path": ["../../outside.jpg"]}]})),
    "r2gen-absolute-image-dir": ("r2gen", None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ESCAPE_CASES))
def test_paths_escaping_the_root_are_refused(tmp_path, case):
    fmt, escape = ESCAPE_CASES[case]
    outside = write_image(tmp_path / "outside" / "outside.jpg")
    write_image(tmp_path / "outside" / "source.jpg")
    root = build(tmp_path, fmt)
    options = {}
    if escape is None:
        options = {"image_dir": str(root / "images")}  # absolute, even though it points inside
    else:
        escape(root, outside)
    out = tmp_path / "out"
    with pytest.raises(PathEscapeError):
        run_import(root, fmt, out, options)
    assert not out.exists() or not any(out.iterdir())


def drop(*path: Any):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return data

    return mutate


def put(*path_and_value: Any):
    *path, value = path_and_value

    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data

    return mutate


def replace(value: Any):
    return lambda data: value


# name -> (fmt, file edited, edit, row named, field named, words in the message)
MALFORMED_CASES = {
    "slake-bad-json": ("slake", "train.json", replace(b'[{"qid": 1,\n "question": }]'), None, None, "line 2, column"),
    "slake-top-level-object": ("slake", "test.json", replace({"qid": 5}), None, None, "top level"),
    "slake-item-not-object": ("slake", "train.json", lambda d: d + ["oops"], 3, None, "expected an object"),
    "slake-missing-question": ("slake", "train.json", drop(1, "question"), 1, "question", "missing"),
    "slake-missing-qid": ("slake", "validate.json", drop(0, "qid"), 0, "qid", "missing"),
    "slake-duplicate-qid": ("slake", "test.json", put(0, "qid", 1), 0, "id", "duplicate id 'slake-1'"),
    "slake-empty-question": ("slake", "train.json", put(0, "question", "  "), 0, "question", "empty"),
    "slake-answer-type": ("slake", "train.json", put(1, "answer_type", "MAYBE"), 1, "answer_type", "'maybe'"),
    "vqarad-missing-image": ("vqarad", VQARAD_JSON, drop(2, "image_name"), 2, "image_name", "missing"),
    "vqarad-empty-image": ("vqarad", VQARAD_JSON, put(2, "image_name", ""), 2, "image_name", "empty"),
    "vqarad-answer-list": ("vqarad", VQARAD_JSON, put(0, "answer", ["yes"]), 0, "answer", "expected text"),
    "vqarad-answer-type": ("vqarad", VQARAD_JSON, put(3, "answer_type", "yes/no"), 3, "answer_type", "'yes/no'"),
    "vqarad-duplicate-qid": ("vqarad", VQARAD_JSON, put(3, "qid", "2"), 3, "id", "duplicate id 'vqarad-2'"),
    "vqarad-no-phrase-type": ("vqarad", VQARAD_JSON, put(1, "phrase_type", None), 1, "phrase_type", "missing"),
    "pathvqa-missing-answer": ("pathvqa", "qas/train/train_qa.pkl", drop(1, "answer"), 1, "answer", "missing"),
    "pathvqa-empty-question": ("pathvqa", "qas/val/val_qa.pkl", put(0, "question", ""), 0, "question", "empty"),
    "pathvqa-top-level": ("pathvqa", "qas/test/test_qa.pkl", replace({"a": 1}), None, None, "top level"),
    "pathvqa-not-a-pickle": ("pathvqa", "qas/test/test_qa.pkl", replace(b"not a pickle"), None, None, "pickle"),
    "pathvqa-bad-json": ("pathvqa", "qas/test/test_qa.json", replace(b"[\n{,"), None, None, "line 2, column 2"),
    "r2gen-top-level-list": ("r2gen", "annotation.json", replace([]), None, None, "top level must be an object"),
    "r2gen-missing-split": ("r2gen", "annotation.json", drop("test"), None, "test", "must be a list"),
    "r2gen-missing-report": ("r2gen", "annotation.json", drop("train", 1, "report"), "train[1]", "report", "missing"),
    "r2gen-empty-report": ("r2gen", "annotation.json", put("test", 0, "report", " "), "test[0]", "report", "empty"),
    "r2gen-split-mismatch": ("r2gen", "annotation.json", put("val", 0, "split", "test"), "val[0]", "split", "'test'"),
    "r2gen-image-path-text": ("r2gen", "annotation.json", put("train", 0, "image_path", "a.png"), "train[0]",
                              "image_path", "list"),
    "r2gen-empty-id": ("r2gen", "annotation.json", put("val", 0, "id", ""), "val[0]", "id", "empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_malformed_files_name_file_row_and_field(tmp_path, case):
    fmt, file, mutate, row, field, words = MALFORMED_CASES[case]
    root = build(tmp_path, fmt)
    rewrite(root, file, mutate)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as info:
        run_import(root, fmt, out)
    exc, message = info.value, str(info.value)
    assert (exc.file, exc.row, exc.field) == (file, row, field)
    assert message.startswith(file) and words in message
    if row is not None:
        assert f"row {row}," in message or f"row {row}:" in message
    if field is not None:
        assert f"field {field!r}" in message
    assert not out.exists() or not any(out.iterdir())


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    root = build(tmp_path, "pathvqa")
    marker = tmp_path / "payload-ran"
    records = [{"image": "train_0001", "question": "q?", "answer": _Payload(f"touch {shlex.quote(str(marker))}")}]
    (root / "qas/train/train_qa.pkl").write_bytes(pickle.dumps(records))
    with pytest.raises(DataFormatError, match=r"^qas/train/train_qa\.pkl: .*refused to load global .*system"):
        read_dataset("pathvqa", root)
    assert not marker.exists()
