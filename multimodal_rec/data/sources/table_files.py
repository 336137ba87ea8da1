"""Reads a table file in chunks: CSV, TSV, Parquet or JSON Lines, each optionally gzip-compressed.

Every chunk is a DataFrame of the asked-for columns (strings from CSV/TSV, JSON values from JSON Lines,
typed columns from Parquet) plus `_line`: the row's line in the file (the line a CSV record ends on, the
JSON line, the Parquet row number), so that a bad row can be reported as `file:line`. A row that cannot
be parsed at all (wrong number of fields, not a JSON object) is counted in `issues` and skipped; a column
that the file lacks is one DatasetError naming it and the file. Memory stays at one chunk of rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from multimodal_rec.data.schema import DataIssues, DatasetError

FORMATS = ("csv", "tsv", "parquet", "jsonl", "sqlite")
SUFFIXES = {".sqlite": "sqlite", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
LINE = "_line"


def resolve_path(path: str | Path) -> Path:
    """`path`, or `path.gz` when only the compressed file exists (configs can name either)."""
    path = Path(path)
    if path.is_file():
        return path
    compressed = path.with_name(path.name + ".gz")
    if compressed.is_file():
        return compressed
    raise DatasetError(f"input file not found: {path}")


def file_format(path: Path, declared: str | None = None) -> str:
    if declared:
        if declared not in FORMATS:
            raise DatasetError(f"format {declared!r} of {path} is not one of {FORMATS}")
        return declared
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    if suffixes and suffixes[-1] in SUFFIXES:
        return SUFFIXES[suffixes[-1]]
    raise DatasetError(f"cannot tell the format of {path} from its name; set `format:` to one of {FORMATS}")


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def read_chunks(path: Path, columns: list[str], issues: DataIssues, fmt: str | None = None,
                chunk_rows: int = 200_000, what: str = "rows") -> Iterator[pd.DataFrame]:
    """Chunks of `columns` (+ `_line`) of the file at `path`, with a progress bar over the bytes read."""
    fmt = file_format(path, fmt)
    columns = list(dict.fromkeys(columns))
    if fmt == "parquet":
        yield from _parquet_chunks(path, columns, chunk_rows)
    elif fmt == "sqlite":
        yield from _sqlite_chunks(path, columns, chunk_rows)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, columns, issues, chunk_rows, what)
    else:
        yield from _csv_chunks(path, columns, issues, chunk_rows, "\t" if fmt == "tsv" else ",", what)


def _sqlite_chunks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The `events` table of a server's event store (serving/event_store.py), read-only, in arrival order."""
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        try:
            present = [row[1] for row in db.execute("PRAGMA table_info(events)")]
        except sqlite3.DatabaseError as error:
            raise DatasetError(f"{path} is not an event store ({error})") from error
        if not present:
            raise DatasetError(f"{path} has no table 'events': not an event store written by serve.py")
        _missing(path, columns, present)
        selected = ", ".join(f'"{c}"' for c in columns)
        cursor = db.execute(f"SELECT {selected}, seq FROM events ORDER BY seq")  # names checked against the table
        while rows := cursor.fetchmany(chunk_rows):
            frame = pd.DataFrame(rows, columns=[*columns, LINE])
            yield frame.astype({c: object for c in columns})


def _progress(path: Path, what: str) -> tqdm:
    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name} ({what})",
                mininterval=1, disable=None)


def _missing(path: Path, columns: list[str], present) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        shown = list(present)[:30]
        also = f" (nor {missing[1:]})" if missing[1:] else ""
        raise DatasetError(f"{path.name} has no column {missing[0]!r}{also}; its columns: {shown}. Map the right "
                           "one in the data config's `columns:`")


def _csv_chunks(path: Path, columns, issues, chunk_rows, delimiter, what) -> Iterator[pd.DataFrame]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long descriptions
    with _open_text(path) as handle, _progress(path, what) as bar:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path} is empty: expected a header row naming its columns")
        header = [h.strip() for h in header]
        _missing(path, columns, header)
        positions = [header.index(c) for c in columns]
        width = len(header)
        rows, lines = [], []
        for row in reader:
            if len(row) != width:
                if len(row) == 0 or row == [""]:
                    continue  # a blank line
                issues.add("malformed_row", f"{path.name}:{reader.line_num}: {len(row)} fields, expected {width}")
                continue
            rows.append([row[p] for p in positions])
            lines.append(reader.line_num)
            if len(rows) >= chunk_rows:
                yield _frame(rows, lines, columns)
                rows, lines = [], []
                _advance(bar, handle)
        if rows:
            yield _frame(rows, lines, columns)
        bar.update(bar.total - bar.n)


def _advance(bar: tqdm, handle) -> None:
    """Moves the bar to the bytes of the text `handle`'s file consumed so far (of the compressed file for .gz)."""
    raw = handle.buffer
    try:
        position = raw.fileobj.tell() if hasattr(raw, "fileobj") else raw.tell()
    except (AttributeError, OSError, ValueError):
        return
    bar.update(max(0, position - bar.n))


def _frame(rows: list, lines: list, columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    frame[LINE] = lines
    return frame


def _jsonl_chunks(path: Path, columns, issues, chunk_rows, what) -> Iterator[pd.DataFrame]:
    seen_keys: set = set()
    checked = False
    with _open_text(path) as handle, _progress(path, what) as bar:
        rows, lines = [], []
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                issues.add("malformed_row", f"{path.name}:{number}: not JSON ({str(error)[:60]})")
                continue
            if not isinstance(record, dict):
                issues.add("malformed_row", f"{path.name}:{number}: not a JSON object")
                continue
            if not checked:
                seen_keys.update(record)
            rows.append([record.get(c) for c in columns])
            lines.append(number)
            if len(rows) >= chunk_rows:
                if not checked:  # a key that no record of the first chunk has is a mapping mistake
                    _missing(path, columns, seen_keys)
                    checked = True
                yield _frame(rows, lines, columns)
                rows, lines = [], []
                _advance(bar, handle)
        if not checked:
            _missing(path, columns, seen_keys)
        if rows:
            yield _frame(rows, lines, columns)
        bar.update(bar.total - bar.n)


def _parquet_chunks(path: Path, columns, chunk_rows) -> Iterator[pd.DataFrame]:
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path} as Parquet: {error}") from error
    _missing(path, columns, table.schema_arrow.names)
    start = 0
    with tqdm(total=table.metadata.num_rows, unit=" rows", desc=f"reading {path.name}", mininterval=1,
              disable=None) as bar:
        for batch in table.iter_batches(batch_size=chunk_rows, columns=columns):
            frame = batch.to_pandas(types_mapper=None)
            frame = frame.astype(object).where(frame.notna(), None) if len(frame) else frame
            frame[LINE] = range(start + 1, start + len(frame) + 1)
            start += len(frame)
            bar.update(len(frame))
            yield frame
