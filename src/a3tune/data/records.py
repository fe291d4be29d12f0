"""What a data set reader yields, and the checks every reader's output goes through.

A reader (one module per published format) turns raw files into ``RawDataset``: the annotation
files it read (their hashes go into provenance) and one ``RawSample`` per question or report.
``check_samples`` then enforces the rules every format shares, with errors that name the file, the
row and the field, so a user can fix the data set file rather than guess. The small helpers at
the end (options, JSON loading, record iteration, path joining) are what the readers share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from a3tune.io.contracts import ANSWER_TYPES, SPLITS, TASKS


class DataFormatError(ValueError):
    """A data set file that does not follow its published format."""

    def __init__(self, file: str | Path, row: int | str | None, field: str | None, message: str):
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.row, self.field = str(file), row, field


@dataclasses.dataclass
class RawSample:
    """One question (or report) as read from a data set file, before images are probed."""

    sample_id: str
    split: str
    image_path: str  # relative to the data root
    question: str
    answer: str
    answer_type: str  # closed / open / report
    task: str = "vqa"
    organ: str | None = None
    location: str | None = None
    modality: str | None = None
    gt_mask_path: str | None = None  # relative to the data root
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: tuple[str, int | str] = ("?", "?")  # (file, row) for error messages


@dataclasses.dataclass
class RawDataset:
    files: list[Path]
    samples: list[RawSample]


def text_field(
    record: dict, field: str, file: str | Path, row: int | str, *, required: bool = True, nonempty: bool = False
) -> str | None:
    """A field as stripped text (numbers, which some data sets use for answers, become text).

    ``nonempty`` makes blank text an error here, for fields (ids, file names) that are turned into
    something else before ``check_samples`` could name them.
    """
    if field not in record or record[field] is None:
        if required:
            raise DataFormatError(file, row, field, "missing")
        return None
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataFormatError(file, row, field, f"expected text, got {type(value).__name__}")
    text = str(value).strip()
    if nonempty and not text:
        raise DataFormatError(file, row, field, "is empty")
    return text


def check_samples(samples: list[RawSample]) -> None:
    """Shared rules: non-empty text, known vocabularies, unique ids."""
    seen: dict[str, tuple[str, int | str]] = {}
    for sample in samples:
        file, row = sample.source
        for field in ("sample_id", "image_path", "question", "answer"):
            if not getattr(sample, field):
                raise DataFormatError(file, row, field, "is empty")
        for field, allowed in (("split", SPLITS), ("answer_type", ANSWER_TYPES), ("task", TASKS)):
            if getattr(sample, field) not in allowed:
                raise DataFormatError(file, row, field, f"{getattr(sample, field)!r} is not one of {list(allowed)}")
        if sample.sample_id in seen:
            first_file, first_row = seen[sample.sample_id]
            raise DataFormatError(
                file, row, "id", f"duplicate id {sample.sample_id!r} (first at {first_file}, row {first_row})"
            )
        seen[sample.sample_id] = sample.source


def take_options(fmt: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``options``; an option the format does not know is a ValueError."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"{fmt}: unknown option(s) {', '.join(map(repr, unknown))}; known options: {known}")
    return {**defaults, **options}


def load_json(root: Path, relative: str, expected: type[list] | type[dict]) -> Any:
    """Parse ``root / relative``; bad JSON or a top level of the wrong type names the file."""
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        message = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        raise DataFormatError(relative, None, None, message) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise DataFormatError(relative, None, None, message) from None
    check_top_level(data, expected, relative)
    return data


def check_top_level(data: Any, expected: type[list] | type[dict], file: str | Path) -> None:
    if not isinstance(data, expected):
        wanted = "a list of records" if expected is list else "an object"
        raise DataFormatError(file, None, None, f"top level must be {wanted}, got {type(data).__name__}")


def iter_records(items: list, file: str | Path, row_format: str | None = None) -> Iterator[tuple[int | str, dict]]:
    """(row, record) for each item of a list; the row is the 0-based index, or ``row_format``
    filled with it (e.g. ``"test[{}]"``). An item that is not an object is an error naming its row."""
    for index, item in enumerate(items):
        row: int | str = row_format.format(index) if row_format else index
        if not isinstance(item, dict):
            raise DataFormatError(file, row, None, f"expected an object, got {type(item).__name__}")
        yield row, item


def join_path(folder: str, name: str, file: str | Path, row: int | str, field: str) -> str:
    """``folder/name`` as a root-relative POSIX path, for an image name read from ``field``.

    An absolute ``name`` stays absolute, so the importer's ``resolve_under`` refuses it rather than
    the join quietly making it relative; an empty name is an error here, before it becomes ``folder``.
    """
    if not name:
        raise DataFormatError(file, row, field, "is empty")
    return (PurePosixPath(folder) / name).as_posix()
