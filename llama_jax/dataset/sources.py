"""Input files of prepare_data.py: which files a list of paths, folders and globs names, how they are cut into
units of work, and the documents each unit holds.

A unit is one shard's worth of input: a batch of small text files, a byte range of an uncompressed .jsonl file
(the lines that start inside it, so big files split over workers), a whole compressed file (a stream cannot be
entered in the middle), or a range of a Parquet file's row groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

from llama_jax.data import TEXT_SUFFIXES, DataError

COMPRESSED = (".gz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # not .json: a JSON document (or a manifest) is not one record a line
MAX_UNIT_BYTES = 64 << 20  # input bytes per unit: big enough to amortise a shard, small enough to spread
MIN_UNIT_BYTES = 1 << 20


def unit_bytes_for(files: list[Path]) -> int:
    """About 64 units for a small corpus (enough for any worker count), 64 MB each for a big one; it depends on
    the inputs alone, so a resumed run with other --workers plans the same shards."""
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, sum(_size(f) for f in files) // 64)))


def kind_of(path: Path) -> str | None:
    """"text", "jsonl" or "parquet" by suffix (under any .gz/.zst); None for a file a folder scan skips."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last == ".parquet" and path.suffix.lower() not in COMPRESSED:
        return "parquet"
    return "text" if last in TEXT_SUFFIXES else None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by paths, folders (every readable kind under it) and globs, without repeats, in given order."""
    files: dict[Path, None] = {}
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: the pattern matches no file")
        else:
            matches = [Path(item)]
        for path in matches:
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p))
                if not found:
                    raise DataError(f"{path}: folder holds no text, .jsonl or .parquet files")
                files.update(dict.fromkeys(found))
            elif path.is_file():
                files[path] = None
            else:
                raise DataError(f"{path}: no such file or folder")
    return list(files)


@dataclasses.dataclass(frozen=True)
class Unit:
    """files: text files read whole, or one file with [start, stop) bytes (jsonl) or row groups (parquet)."""

    kind: str
    files: tuple[str, ...]
    start: int = 0
    stop: int = -1
    size: int = 0  # input bytes, for the progress bar's MB/s

    def describe(self) -> dict:
        """As a shard's record stores it (JSON: files as a list)."""
        return {**dataclasses.asdict(self), "files": list(self.files)}


def plan_units(files: list[Path], unit_bytes: int | None = None) -> list[Unit]:
    """The units of work, in a deterministic order: the same inputs always give the same shards."""
    unit_bytes = unit_bytes or unit_bytes_for(files)
    units: list[Unit] = []
    batch: list[Path] = []
    batch_bytes = 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            units.append(Unit("text", tuple(map(str, batch)), size=batch_bytes))
        batch, batch_bytes = [], 0

    for path in files:
        kind, size = kind_of(path) or "text", _size(path)
        if kind == "text":
            batch.append(path)
            batch_bytes += size
            if batch_bytes >= unit_bytes:
                flush()
            continue
        flush()  # documents keep the order of the inputs
        if kind == "parquet":
            groups, sizes = _row_groups(path)
            per_unit = max(1, int(len(groups) * unit_bytes // max(sum(sizes), 1)))
            for g in range(0, len(groups), per_unit):
                units.append(Unit(kind, (str(path),), g, min(g + per_unit, len(groups)), sum(sizes[g:g + per_unit])))
        elif path.suffix.lower() in COMPRESSED:
            units.append(Unit(kind, (str(path),), 0, size, size))
        else:
            for start in range(0, max(size, 1), unit_bytes):
                stop = min(start + unit_bytes, size)
                units.append(Unit(kind, (str(path),), start, stop, stop - start))
    flush()
    return units


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _row_groups(path: Path) -> tuple[list[int], list[int]]:
    meta = _parquet(path).metadata
    groups = list(range(meta.num_row_groups))
    return groups, [meta.row_group(g).total_byte_size for g in groups]


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'llama_jax[data]')") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _open(path: Path) -> IO[bytes]:
    """The decompressed byte stream of a file."""
    suffix = path.suffix.lower()
    raw = open(path, "rb")
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"{path}: reading .zst needs zstandard (pip install 'llama_jax[data]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def documents(unit: Unit, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of a unit, in order; a DataError names the file (and line) of bad input."""
    with _reading(unit):
        if unit.kind == "text":
            for name in unit.files:
                with _open(Path(name)) as f:
                    text = _decode(f.read(), name)
                if text.strip():
                    yield text
        elif unit.kind == "jsonl":
            for line, where in _jsonl_lines(Path(unit.files[0]), unit):
                text = _record_text(line, text_field, where)
                if text.strip():
                    yield text
        else:
            yield from _parquet_documents(Path(unit.files[0]), unit, text_field)


def jsonl_lines(unit: Unit) -> Iterator[tuple[bytes, Line]]:
    """(line, where it is) of each non-blank line of a .jsonl unit, in order, for a caller that parses records
    itself (chat records); a file that cannot be read is a DataError naming it."""
    with _reading(unit):
        yield from _jsonl_lines(Path(unit.files[0]), unit)


@contextlib.contextmanager
def _reading(unit: Unit) -> Iterator[None]:
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # OSError, gzip's and zstandard's errors: a file that cannot be read as what it claims
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"{unit.files[0] if len(unit.files) == 1 else ', '.join(unit.files)}: cannot read "
                        f"({reason})") from None


class Line:
    """"file:line" of a .jsonl record as str() gives it; the line number of a unit that starts inside a file is
    counted only when an error message prints it."""

    def __init__(self, path: Path, first: int, n: int):
        self.path, self.first, self.n = path, first, n  # n: the line's number counted from byte offset `first`

    def __str__(self) -> str:
        return f"{self.path}:{(_lines_before(self.path, self.first) if self.first else 0) + self.n}"


def _jsonl_lines(path: Path, unit: Unit) -> Iterator[tuple[bytes, Line]]:
    compressed = path.suffix.lower() in COMPRESSED
    with _open(path) as f:
        first = 0  # byte offset of this unit's first line
        if unit.start and not compressed:
            f.seek(unit.start - 1)
            f.readline()  # the line that started before this unit belongs to the previous one
            first = f.tell()
        n = 0
        while compressed or f.tell() < unit.stop:
            line = f.readline()
            if not line:
                break
            n += 1
            if line.strip():
                yield line, Line(path, first, n)


def _lines_before(path: Path, offset: int) -> int:
    """Lines before a byte offset of an uncompressed file: counted only when an error message needs it."""
    with open(path, "rb") as raw:
        return raw.read(offset).count(b"\n")


def _record_text(line: bytes, field: str, where: Line) -> str:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        hint = " (this is a chat record: prepare_data.py reads those with --chat)" if is_chat_record(record) else ""
        raise DataError(f'{where}: expected an object with a string "{field}" field{hint}')
    return record[field]


def is_chat_record(record) -> bool:
    """Whether a parsed .jsonl record is a chat record (messages, or prompt and completion)."""
    return isinstance(record, dict) and ("messages" in record or "completion" in record)


def _parquet_documents(path: Path, unit: Unit, field: str) -> Iterator[str]:
    parquet = _parquet(path)
    if field not in parquet.schema_arrow.names:
        raise DataError(f'{path}: no "{field}" column (columns: {", ".join(parquet.schema_arrow.names)})')
    for group in range(unit.start, unit.stop):
        for n, text in enumerate(parquet.read_row_group(group, columns=[field]).column(0).to_pylist()):
            if text is not None and not isinstance(text, str):
                raise DataError(f'{path}: row group {group}, row {n}: "{field}" is not a string')
            if text and text.strip():
                yield text
