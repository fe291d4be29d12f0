"""The column contracts between stages (DESIGN.md §3).

Each contract names the columns a manifest must have, with their polars dtypes. Stages may add
columns freely; a missing column or a wrong dtype is an error naming the artifact, the column and
what was expected. Nullable columns may be all-null (dtype ``Null``) in a data set that lacks them.
"""

from __future__ import annotations

import dataclasses

import polars as pl

STATUS_OK = "ok"


@dataclasses.dataclass(frozen=True)
class Column:
    dtype: pl.DataType
    nullable: bool = False
    unique: bool = False


def _str(nullable: bool = False, unique: bool = False) -> Column:
    return Column(pl.String(), nullable=nullable, unique=unique)


CONTRACTS: dict[str, dict[str, Column]] = {
    "samples": {
        "sample_id": _str(unique=True),
        "dataset": _str(),
        "split": _str(),
        "image_id": _str(),
        "question": _str(),
        "answer": _str(),
        "answer_type": _str(),
        "task": _str(),
        "organ": _str(nullable=True),
        "location": _str(nullable=True),
        "modality": _str(nullable=True),
        "gt_mask_ref": _str(nullable=True),
    },
    "images": {
        "image_id": _str(unique=True),
        "path": _str(),
        "sha256": _str(nullable=True),
        "height": Column(pl.Int32(), nullable=True),
        "width": Column(pl.Int32(), nullable=True),
        "status": _str(),
        "error": _str(nullable=True),
    },
    "proposals": {
        "image_id": _str(),
        "sha256": _str(),
        "mask_row": Column(pl.Int64(), nullable=True),
        "bbox_xywh": Column(pl.List(pl.Int32()), nullable=True),
        "area": Column(pl.Int64(), nullable=True),
        "predicted_iou": Column(pl.Float32(), nullable=True),
        "stability_score": Column(pl.Float32(), nullable=True),
    },
    "labels": {
        "sample_id": _str(unique=True),
        "label_row": Column(pl.Int64(), nullable=True),
        "n_masks": Column(pl.Int32()),
        "proposal_rows": Column(pl.List(pl.Int64())),
        "clip_scores": Column(pl.List(pl.Float32())),
        "query_text": _str(nullable=True),
        "status": _str(),
    },
    "heads": {
        "layer": Column(pl.Int32()),
        "head": Column(pl.Int32()),
        "score": Column(pl.Float64()),
        "inside_score": Column(pl.Float64(), nullable=True),
        "rank": Column(pl.Int32()),
        "selected": Column(pl.Boolean()),
    },
}

SPLITS = ("train", "val", "test")
ANSWER_TYPES = ("closed", "open", "report")
TASKS = ("vqa", "report")


class ContractError(ValueError):
    """A manifest that does not follow its contract."""


def check_contract(df: pl.DataFrame, contract: str, source: str = "dataframe") -> None:
    """Raise ``ContractError`` naming the first column that breaks ``contract``."""
    try:
        columns = CONTRACTS[contract]
    except KeyError:
        raise ValueError(f"unknown contract {contract!r}; known: {', '.join(CONTRACTS)}") from None
    for name, col in columns.items():
        if name not in df.columns:
            raise ContractError(f"{source}: {contract} contract needs column {name!r}; has {df.columns}")
        dtype = df.schema[name]
        if dtype != col.dtype and not (col.nullable and dtype == pl.Null):
            raise ContractError(f"{source}: column {name!r} has dtype {dtype}, the {contract} contract wants {col.dtype}")
        if not col.nullable and df[name].null_count():
            raise ContractError(f"{source}: column {name!r} has {df[name].null_count()} null values; it must not")
        if col.unique and df[name].n_unique() != df.height:
            dup = df.filter(pl.col(name).is_duplicated())[name].head(3).to_list()
            raise ContractError(f"{source}: column {name!r} must be unique; duplicated values such as {dup}")
    if contract == "samples":
        _check_vocabulary(df, source, "split", SPLITS)
        _check_vocabulary(df, source, "answer_type", ANSWER_TYPES)
        _check_vocabulary(df, source, "task", TASKS)


def _check_vocabulary(df: pl.DataFrame, source: str, column: str, allowed: tuple[str, ...]) -> None:
    bad = df.filter(~pl.col(column).is_in(list(allowed)))[column].unique().to_list()
    if bad:
        raise ContractError(f"{source}: column {column!r} has values {bad} outside {list(allowed)}")


def empty_frame(contract: str) -> pl.DataFrame:
    """A zero-row frame with exactly the contract's columns and dtypes."""
    return pl.DataFrame(schema={name: col.dtype for name, col in CONTRACTS[contract].items()})
