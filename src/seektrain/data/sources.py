"""Readers that turn inputs (files, folders, JSONL, Parquet, `stdlib`) into a stream of raw documents.

Readers yield bytes for plain files (decoding is a cleaning step with a stated policy) and str for
JSONL/Parquet (already decoded by their parsers). Files are visited in sorted order so that the same
input always gives the same document order, which makes `prepare` reproducible byte for byte.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seektrain.errors import UserError, first_line

TEXT_EXTENSIONS = (
    ".txt",
    ".md",
    ".py",
    ".rst",
    ".text",
    ".markdown",
    ".c",
    ".h",
    ".js",
    ".ts",
    ".rs",
    ".go",
    ".java",
    ".cpp",
    ".hpp",
    ".sh",
    ".toml",
    ".yaml",
    ".yml",
    ".html",
    ".tex",
)
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
STDLIB = "stdlib"


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it (`kind` is text, jsonl or parquet)."""

    path: Path
    kind: str
    size: int


@dataclass
class Document:
    """One raw document: where it came from and its content (bytes from text files and from JSONL texts
    that are not all UTF-8, str otherwise)."""

    source: str
    content: bytes | str | None  # None: a null Parquet value (counted as dropped, never cleaned)
    too_long: bool = False  # a text file over the size limit, not read whole (content None)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if name.endswith(PARQUET_EXTENSIONS) and not path.name.lower().endswith(".gz"):
        return "parquet"
    if name.endswith(TEXT_EXTENSIONS):
        return "text"
    return None


def stdlib_root() -> Path:
    """The running Python's standard library folder: the corpus that exists on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[SourceFile]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append(SourceFile(p, "text", p.stat().st_size))
    return out


def _source_file(path: Path, kind: str) -> SourceFile:
    """`path` with its size; a broken symlink (or another entry that cannot be stat'ed) fails like an
    unreadable file, naming it, rather than being left out of the corpus unnoticed."""
    try:
        return SourceFile(path, kind, path.stat().st_size)
    except OSError as e:
        what = "a broken symbolic link" if path.is_symlink() else e.strerror
        raise UserError(f"cannot read {path}: {what}") from e


def _unreadable_folder(error: OSError) -> None:
    """os.walk's onerror: a folder it cannot list fails the run, naming it (os.walk would skip it)."""
    raise UserError(f"cannot read {error.filename}: {error.strerror}") from error


def discover(inputs: list[str]) -> list[SourceFile]:
    """Expand inputs (files, folders searched recursively, or `stdlib`) into a sorted list of readable files,
    each real file once.

    Raises UserError for a missing path or when nothing readable is found.
    """
    files: list[SourceFile] = []
    for item in inputs:
        if item == STDLIB:
            files.extend(_stdlib_files())
            continue
        path = Path(item)
        if not path.exists():
            if path.is_symlink():  # as one inside a folder is reported
                raise UserError(f"cannot read {item}: a broken symbolic link")
            raise UserError(f"input not found: {item}")
        if path.is_file():
            kind = _kind(path)
            if kind is None:
                raise UserError(
                    f"unsupported input file type: {item} (text: {', '.join(TEXT_EXTENSIONS[:5])} …, "
                    f"JSONL: .jsonl, .ndjson; Parquet: .parquet; text and JSONL may be gzipped: .gz)"
                )
            files.append(_source_file(path, kind))
            continue
        if _special(path) and not path.is_dir():
            raise UserError(f"cannot read {item}: not a regular file or folder")
        found, seen = [], set()
        # Linked folders are followed (a corpus assembled from links is read whole), each real folder
        # once, so a link back to an ancestor cannot loop.
        for dirpath, dirnames, filenames in os.walk(path, onerror=_unreadable_folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                kind = _kind(p)
                if kind is not None and not f.startswith(".") and not _special(p):
                    found.append(_source_file(p, kind))
        if not found:
            raise UserError(f"no readable files (text, jsonl, parquet) under folder: {item}")
        files.extend(found)
    if not files:
        raise UserError("no input files")
    return _each_file_once(files)


def _special(path: Path) -> bool:
    """A named pipe or a device (or a link to one), which reading would wait on or never finish; a broken
    link is not (it is reported when read)."""
    return path.exists() and not path.is_file()


def _each_file_once(files: list[SourceFile]) -> list[SourceFile]:
    """The first of each real file: one reached twice (a folder and its subfolder both given, a file
    named twice, a link to a file of the corpus) would otherwise be read twice, which `--dedup none`
    keeps as duplicated documents."""
    seen: set[str] = set()
    once = []
    for f in files:
        real = os.path.realpath(f.path)
        if real not in seen:
            seen.add(real)
            once.append(f)
    return once


# What reading a file can raise: OSError (gzip.BadGzipFile too), EOFError (a truncated gzip stream),
# zlib.error (damaged gzip data).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def read_text_file(path: Path, max_bytes: int | None = None) -> bytes | None:
    """Whole file as bytes (gunzipped when the name ends in .gz); None where it holds more than
    `max_bytes`, found without reading it (a plain file) or by reading no more than that (gzip, whose
    text may be a thousand times its size on disk)."""
    gz = _is_gzip(path)
    try:
        if max_bytes is not None and not gz and path.stat().st_size > max_bytes:
            return None
        with _open_bytes(path) as f:
            if max_bytes is None or not gz:
                return f.read()
            data = bytearray()
            while len(data) <= max_bytes and (piece := f.read(_GZIP_PIECE)):  # read(n) reserves n bytes
                data += piece
    except _READ_ERRORS as e:
        raise UserError(f"cannot read {path}: {e}") from e
    return None if len(data) > max_bytes else bytes(data)


_GZIP_PIECE = 1 << 20  # bytes of text a gzipped file is read in, under a size limit


def _read_lines(path: Path) -> Iterator[bytes]:
    """Lines of a file (gunzipped when the name ends in .gz); a damaged or truncated gzip stream is found
    only while reading, so errors are turned into a UserError naming the file here, not at open."""
    try:
        with _open_bytes(path) as f:
            yield from f
    except _READ_ERRORS as e:
        raise UserError(f"cannot read {path}: {e}") from e


def iter_jsonl(
    path: Path, text_field: str, skip_bad_lines: bool, stats: dict
) -> Iterator[str | bytes | None]:
    """Documents from a JSONL file, one object per line; `text_field` names the text. A `null` text is
    None, which the caller counts as Parquet's nulls are (`null_text`), not a bad line.

    A line that is not JSON (or lacks the field) fails with its line number unless `skip_bad_lines`,
    in which case it is counted in `stats["bad_jsonl_lines"]` and skipped.
    """
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        raw_bytes = False
        try:
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:  # bytes that are not UTF-8: the text goes on as those bytes, which
                # cleaning decodes (replaced as in a text file); a BOM goes, as json.loads drops it
                obj, raw_bytes = json.loads(line.decode("utf-8-sig", "surrogateescape")), True
            if not isinstance(obj, dict):
                kind = _JSON_KINDS.get(type(obj), type(obj).__name__)
                raise _NotAnObject(f"is a JSON {kind}, not an object")
            text = obj[text_field]
            if text is not None and not isinstance(text, str):
                raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: nested too deep
            if skip_bad_lines:
                stats["bad_jsonl_lines"] = stats.get("bad_jsonl_lines", 0) + 1
                continue
            if isinstance(e, KeyError):
                what = f"has no field {text_field!r}"
            else:
                what = str(e) if isinstance(e, _NotAnObject) else f"is not valid: {e}"
            raise UserError(
                f"{path}:{lineno}: JSONL line {what} (use --text-field to pick the field, "
                f"--skip-bad-lines to count and skip such lines)"
            ) from e
        yield _undecoded(text) if raw_bytes and text is not None else text


def _undecoded(text: str) -> bytes | str:
    """The bytes a JSONL text held, where they were not all UTF-8 (decoded with surrogateescape): cleaning
    then replaces the bad ones, or drops the document, as it does a text file's. Kept as text where it also
    holds escaped lone surrogates (`\\ud83d`), which no bytes stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text


class _NotAnObject(TypeError):
    """A JSONL line that holds JSON, but not an object."""


_JSON_KINDS = {
    str: "string", int: "number", float: "number", bool: "boolean", list: "array", type(None): "null"
}  # fmt: skip


def _is_text_type(arrow_type) -> bool:
    """Whether a column of this Arrow type reads as Python strings (dictionary-encoded ones included), or
    nulls only (a column of nothing but nulls has type null: its values are counted as null texts)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return str(arrow_type) in ("string", "large_string", "string_view", "null")


def iter_parquet(path: Path, text_field: str) -> Iterator[str | bytes | None]:
    """Documents from a Parquet column, streamed one row group at a time (memory stays bounded); None for
    a null value, so that the caller can count it."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"cannot read Parquet file {path}: {first_line(e)}") from e
    if text_field not in pf.schema_arrow.names:
        raise UserError(
            f"{path}: Parquet file has no column {text_field!r} (columns: "
            f"{', '.join(pf.schema_arrow.names)}); use --text-field"
        )
    column_type = pf.schema_arrow.field(text_field).type
    if not _is_text_type(column_type):
        raise UserError(
            f"{path}: Parquet column {text_field!r} holds {column_type}, not text (string); "
            f"use --text-field to pick a text column"
        )
    try:
        for i in range(pf.num_row_groups):
            yield from _text_values(pf.read_row_group(i, columns=[text_field]).column(0))
    except Exception as e:
        raise UserError(f"cannot read Parquet file {path}: {first_line(e)}") from e


def _text_values(column) -> list[str | bytes | None]:
    """A string column's values; where some are not valid UTF-8 (Parquet writers need not check), the
    row group's raw bytes instead, which cleaning decodes under the same invalid-UTF-8 policy as a text
    file's (a few bad bytes replaced, a mostly invalid document dropped) rather than stopping the run."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_dictionary(column.type):
            column = pa.chunked_array([chunk.dictionary_decode() for chunk in column.chunks])
        return pc.cast(column, pa.large_binary()).to_pylist()


def iter_documents(
    files: list[SourceFile],
    text_field: str = "text",
    skip_bad_lines: bool = False,
    stats: dict | None = None,
    max_text_bytes: int | None = None,
) -> Iterator[tuple[SourceFile, Document]]:
    """All documents of all files in order, each with the file it came from (for progress by bytes). A
    text file of more than `max_text_bytes` comes as a `too_long` document, unread."""
    stats = {} if stats is None else stats
    for sf in files:
        name = str(sf.path)
        if sf.kind == "text":
            content = read_text_file(sf.path, max_text_bytes)
            yield sf, Document(name, content, too_long=content is None)
        elif sf.kind == "jsonl":
            for text in iter_jsonl(sf.path, text_field, skip_bad_lines, stats):
                yield sf, Document(name, text)
        else:
            for text in iter_parquet(sf.path, text_field):
                yield sf, Document(name, text)
