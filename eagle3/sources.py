"""Where conversations come from: `data.path` → an ordered list of parts (files, or row groups of Parquet files),
and the records of each part.

Accepted: .jsonl (one record per line) and .json (a list, possibly cut off at the end) files in ShareGPT or OpenAI
layout, Parquet files with a `conversations` or `messages` column, Hugging Face `datasets` folders (`save_to_disk`
of a Dataset or a DatasetDict, or a hub-layout folder of parquet/jsonl/json files), globs, and lists of these.
Records keep their order: parts in path order (a glob or a folder sorted by name), records in file order, so a
run sees the same sample order whatever reads them. Pure pyarrow; Ray Data runs these readers in its tasks
(jobs/ingest.py).
"""
from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eagle3.data import DataError, iter_records, record_location

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
MESSAGE_COLUMNS = ("conversations", "messages")
# Files in a datasets folder that hold metadata, not records.
_META_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json", "README.md",
               "aerie_regenerated.json"}  # the last: the stamp jobs.regenerate writes next to its output
_LAYOUT_HINT = ("give {what} a .jsonl/.json/.parquet file, a glob such as 'data/*.jsonl', a Hugging Face "
                "datasets folder (save_to_disk, or a hub-layout folder of parquet/jsonl files), or a list of these")


def _hint(what: str) -> str:
    return _LAYOUT_HINT.format(what=what)


class SourceError(ValueError):
    """data.path names nothing readable; the message says what was found and what to give instead."""


@dataclass(frozen=True)
class Part:
    """A unit of reading: a whole file, or one row group of a Parquet file."""

    path: str
    kind: Literal["json", "jsonl", "parquet", "arrow"]
    group: int | None = None  # Parquet row group; None = the whole file
    first: int = 0  # index within its file of the part's first record
    rows: int | None = None  # records in the part, where the file's metadata says (Parquet); else None
    size: int = 0  # bytes on disk (the whole file's for a row group's share: size × rows / file rows)


def resolve_parts(spec: str | Sequence[str], split: str = "train", what: str = "data.path") -> list[Part]:
    """The parts `spec` names, in reading order. Raises SourceError for a name that matches nothing readable;
    `what` names the setting in messages."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise SourceError(f"{what} is an empty list; {_hint(what)}")
    files: list[Path] = []
    for entry in entries:
        files += _files_of(entry, split, what)
    seen, parts = set(), []
    for f in files:
        key = f.resolve()
        if key in seen:
            continue  # a file named twice (overlapping globs) is read once
        seen.add(key)
        parts += _parts_of(f)
    return parts


def _files_of(entry: str, split: str, what: str) -> list[Path]:
    if any(c in entry for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(entry, recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix in SUFFIXES and m.name not in _META_FILES]
        if not files:
            found = f" (it matches {len(matches)} paths, none a {'/'.join(SUFFIXES)} file)" if matches else ""
            raise SourceError(f"{what}={entry!r} matches no dataset file{found}; {_hint(what)}")
        return files
    p = Path(entry)
    if p.is_dir():
        return _folder_files(p, split, what)
    if not p.exists():
        raise SourceError(f"{what}={entry!r} does not exist; {_hint(what)}")
    if p.suffix not in SUFFIXES:
        raise SourceError(f"{what}={entry!r}: {p.suffix or 'no suffix'} is not a dataset file type; {_hint(what)}")
    return [p]


def _folder_files(folder: Path, split: str, what: str = "data.path") -> list[Path]:
    """Files of a datasets folder: save_to_disk (state.json names its arrow files), a DatasetDict (one folder per
    split), or a hub layout (data files anywhere below; those named after `split` when files are split-named)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise SourceError(f"{what}={str(folder)!r} is a DatasetDict with splits {splits}, not {split!r}; "
                              f"set data.split to one of them")
        return _folder_files(folder / split, split, what)
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise SourceError(f"{state}: not a datasets save_to_disk state file ({e}); re-save the dataset") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SourceError(f"{folder}: save_to_disk lists {missing[0]!r}, which is missing; copy the whole folder")
        return [folder / n for n in names]
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                   and f.name not in _META_FILES and not any(s.startswith(".") for s in f.relative_to(folder).parts))
    if not files:
        raise SourceError(f"{what}={str(folder)!r} is a folder with no {'/'.join(SUFFIXES)} files; {_hint(what)}")

    def split_of(f: Path) -> str | None:  # hub conventions: data/train-00000-of-00002.parquet, train/x.jsonl
        rel = f.relative_to(folder).parts
        names = [*rel[:-1], f.stem]
        return next((n.split("-")[0].split(".")[0] for n in names if n.split("-")[0].split(".")[0] in
                     ("train", "test", "validation", "valid", "dev", "eval")), None)

    named = {split_of(f) for f in files} - {None}
    if named:
        if split not in named:
            raise SourceError(f"{what}={str(folder)!r} has splits {sorted(named)}, not {split!r}; set data.split")
        files = [f for f in files if split_of(f) == split]
    return files


def _parts_of(f: Path) -> list[Part]:
    kind = SUFFIXES[f.suffix]
    size = f.stat().st_size
    if kind != "parquet":
        return [Part(str(f), kind, size=size)]
    pf = open_parquet(f)
    meta = pf.metadata
    total = max(meta.num_rows, 1)
    parts, first = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        parts.append(Part(str(f), kind, group=g, first=first, rows=n, size=size * n // total))
        first += n
    return parts


def open_parquet(path: str | Path):
    """pyarrow's ParquetFile with a clear error for a file that is not Parquet, or not a whole one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e}); re-write it, e.g. with "
                          "pandas.DataFrame.to_parquet or datasets' Dataset.to_parquet") from e
    names = pf.schema_arrow.names
    if not any(c in names for c in MESSAGE_COLUMNS):
        raise SourceError(f"{path}: no 'conversations' (ShareGPT) or 'messages' (OpenAI) column (its columns: "
                          f"{', '.join(names) or 'none'}); rename the column that holds the turns to one of them")
    return pf


def fingerprint(parts: Sequence[Part]) -> str:
    """sha256 over the content of every file, in reading order: an edit anywhere is a new dataset, a copy is not."""
    h = hashlib.sha256()
    for path in dict.fromkeys(p.path for p in parts):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0file\0")
    return h.hexdigest()


def read_part(part: Part) -> Iterator[tuple[int, dict | DataError]]:
    """(index within the file, record or DataError) for each record of `part`, in order."""
    if part.kind in ("json", "jsonl"):
        yield from iter_records(Path(part.path))
        return
    if part.kind == "parquet":
        pf = open_parquet(part.path)
        batches = pf.iter_batches(row_groups=[part.group], batch_size=1024)
    else:
        batches = _arrow_batches(part.path)
    index = part.first
    for rb in batches:
        for row in rb.to_pylist():
            yield index, row
            index += 1


def _arrow_batches(path: str):
    """Record batches of an Arrow file: the IPC stream format datasets' save_to_disk writes, or the file format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise SourceError(f"{path}: not an Arrow IPC file ({e}); give the folder datasets' save_to_disk wrote, "
                              "or convert it to Parquet") from e
        names = reader.schema.names
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        names, batches = reader.schema.names, reader
    if not any(c in names for c in MESSAGE_COLUMNS):
        raise SourceError(f"{path}: no 'conversations' (ShareGPT) or 'messages' (OpenAI) column (its columns: "
                          f"{', '.join(names) or 'none'}); rename the column that holds the turns to one of them")
    yield from batches


def part_location(part: Part, index: int, record: dict | DataError) -> str:
    """Where a record is, for messages: "<file>: record 3 (line 4) id='x'" or "<file>: row 1200"."""
    if part.kind in ("parquet", "arrow"):
        where = f"row {index}" + (f" id={record['id']!r}" if isinstance(record, dict) and "id" in record else "")
    else:
        where = record_location(Path(part.path), index, record)
    return f"{part.path}: {where}"


def sample_id(record: dict | DataError, index: int, file_no: int, many_files: bool) -> str:
    """The record's "id", else its index in its file (prefixed with the file's position when there are several)."""
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"{file_no}:{index}" if many_files else str(index)


def iter_source_records(parts: Sequence[Part]) -> Iterator[tuple[Part, int, dict | DataError]]:
    """Every record of every part, in reading order."""
    for part in parts:
        for index, record in read_part(part):
            yield part, index, record
