"""Artifact I/O: atomic writes, provenance round trips, contracts and inspect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from a3tune.io import (
    Provenance,
    atomic_dir,
    atomic_file,
    hash_path,
    open_store,
    read_parquet,
    read_provenance,
    write_parquet,
    write_store,
)
from a3tune.io.atomic import is_temporary
from a3tune.io.contracts import ContractError, check_contract, empty_frame
from a3tune.io.inspect import inspect_path

PROV = Provenance(stage="test", params={"k": 8, "name": "x"}, inputs={"samples.parquet": "ab" * 32})


def test_parquet_provenance_round_trip(tmp_path):
    path = write_parquet(pl.DataFrame({"a": [1, 2]}), tmp_path / "a.parquet", PROV)
    assert read_provenance(path) == PROV
    assert read_parquet(path)["a"].to_list() == [1, 2]


def test_zarr_provenance_round_trip_and_chunks(tmp_path):
    masks = np.random.default_rng(0).random((3, 16, 16)) > 0.5
    path = write_store(tmp_path / "m.zarr", {"masks": masks}, PROV)
    assert read_provenance(path) == PROV
    group = open_store(path)
    np.testing.assert_array_equal(group["masks"][:], masks)
    assert group["masks"].chunks == (1, 16, 16)  # one mask per chunk


def test_provenance_rejects_foreign_json():
    with pytest.raises(ValueError, match="not an a3tune provenance"):
        Provenance.from_json('{"foo": 1}')


def test_provenance_hashes_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    (tmp_path / "f").write_text("2")
    prov = Provenance.for_inputs("s", {}, {"dir": tmp_path / "d", "file": tmp_path / "f"})
    before = dict(prov.inputs)
    (tmp_path / "d" / "x").write_text("changed")
    assert hash_path(tmp_path / "d") != before["dir"]
    assert hash_path(tmp_path / "f") == before["file"]


def test_rewrite_is_bitwise_identical(tmp_path):
    """No timestamps: the same content and provenance give the same bytes (reruns compare equal)."""
    write_store(tmp_path / "a.zarr", {"m": np.ones((2, 4, 4), bool)}, PROV)
    write_store(tmp_path / "b.zarr", {"m": np.ones((2, 4, 4), bool)}, PROV)
    assert hash_path(tmp_path / "a.zarr") == hash_path(tmp_path / "b.zarr")


def test_atomic_file_failure_leaves_old_content(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_atomic_dir_replaces_and_cleans(tmp_path):
    target = tmp_path / "store"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"]
    assert os.listdir(tmp_path) == ["store"]


@pytest.mark.parametrize("kind", ["parquet", "zarr"])
def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path, kind):
    """SIGKILL in the middle of a write: the target does not exist, only hidden debris."""
    target = tmp_path / ("out.parquet" if kind == "parquet" else "out.zarr")
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, polars as pl
        import a3tune.io.atomic as atomic
        from a3tune.io import Provenance, write_parquet, write_store
        real_replace = os.replace
        def die(src, dst):  # the process dies after writing everything, just before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.replace = die
        prov = Provenance(stage="t")
        if {kind!r} == "parquet":
            write_parquet(pl.DataFrame({{"a": list(range(1000))}}), {str(target)!r}, prov)
        else:
            write_store({str(target)!r}, {{"m": np.ones((50, 64, 64), bool)}}, prov)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = os.listdir(tmp_path)
    assert leftovers and all(is_temporary(name) for name in leftovers)
    with pytest.raises(ValueError, match="no a3tune artifacts"):
        inspect_path(tmp_path)


def test_contract_errors_name_the_column():
    df = empty_frame("samples").drop("question")
    with pytest.raises(ContractError, match="'question'"):
        check_contract(df, "samples", source="s.parquet")
    images = pl.DataFrame(
        {"image_id": ["a", "a"], "path": ["a.png", "b.png"], "sha256": [None, None], "height": [1, 1],
         "width": [1, 1], "status": ["ok", "ok"], "error": [None, None]},
        schema_overrides={"height": pl.Int32, "width": pl.Int32, "sha256": pl.String, "error": pl.String},
    )  # fmt: skip
    with pytest.raises(ContractError, match="unique"):
        check_contract(images, "images")


def test_contract_vocabulary():
    row = {c: "x" for c in empty_frame("samples").columns}
    row.update(split="train", answer_type="maybe", task="vqa")
    with pytest.raises(ContractError, match="answer_type"):
        check_contract(pl.DataFrame([row]), "samples")


def test_inspect_parquet_and_zarr(tmp_path):
    df = pl.DataFrame({"status": ["ok", "ok", "missing"], "x": [1, 2, 3]})
    write_parquet(df, tmp_path / "t.parquet", PROV)
    write_store(tmp_path / "s.zarr", {"masks": np.zeros((2, 4, 4), bool)}, PROV)
    text = inspect_path(tmp_path / "t.parquet")
    assert "3 rows" in text and "ok=2" in text and "missing=1" in text
    assert "stage=test" in text and '"k": 8' in text
    text = inspect_path(tmp_path / "s.zarr")
    assert "masks: shape=(2, 4, 4)" in text and "stage=test" in text
    both = inspect_path(tmp_path)
    assert "t.parquet" in both and "s.zarr" in both


def test_inspect_reports_missing_provenance(tmp_path):
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "foreign.parquet")
    assert "provenance: MISSING" in inspect_path(tmp_path / "foreign.parquet")
