"""Input file formats: which files a path names, and how rows come out of JSONL and Parquet.

The reader (reader.py) decides batches and ids; this module knows the files: resolving a file, glob or
folder; reading a JSONL line range from a checkpoint; reading a Parquet row range while jumping over
whole row groups; parsing one JSONL line into a row or a reason it is not one; and the id helpers.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from base64 import b64encode
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..common import layout
from ..config import InputConfig
from ..errors import InputError
from . import storage

_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_FORCED_EXTENSIONS = {"parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".ndjson", ".json")}
_SUPPORTED = ".parquet, .jsonl, .ndjson"
log = logging.getLogger("pipeline")
PQ_CHUNK = 65_536    # rows per Arrow batch when scanning Parquet


@dataclass
class File:
    path: str
    kind: str
    name: str = ""
    rows: int = 0
    schema: pa.Schema | None = None
    rg_starts: tuple[int, ...] = ()
    stamp: tuple[int, int, int] | None = None   # (size, mtime_ns, inode) when the scan read it
    content_hash: bytes = b""                   # Parquet only: the file's bytes, hashed by the scan
    options: dict[str, Any] | None = None  # input.storage_options, for s3:// and gs:// paths


def parse(raw: bytes, line: int) -> dict[str, Any] | str:
    """The row object, or (as a str) why the line is not one; a str return keeps hot loops flat."""
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return f"line is not valid UTF-8 (byte {uexc.start}); re-encode the file as UTF-8"
        return f"line is not valid JSON: {exc}"
    if type(obj) is not dict:
        return f"line holds a JSON {type(obj).__name__.replace('NoneType', 'null')}, not an object"
    return obj


def jsonl_objects(path: str, options: dict[str, Any] | None = None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with open_binary(path, options) as fh:
        for line, raw in enumerate(fh, 1):
            if not raw.isspace():
                yield line, parse(raw, line)


def json_default(value: Any) -> str:
    # Parquet values orjson cannot serialize (bytes, Decimal); only hashed, so any stable text will do.
    return b64encode(bytes(value)).decode() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def digest8(obj: dict[str, Any]) -> bytes:
    """The first 8 bytes of the row's content hash: its derived id (as hex) and its dedup key."""
    opts = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    return hashlib.sha256(orjson.dumps(obj, default=json_default, option=opts)).digest()[:8]


def json_id(value: Any, path: str, line: int, column: str) -> str:
    if type(value) is str and value:
        return value
    if type(value) is int:
        return str(value)
    if value is None or value == "":
        raise InputError(f"empty or missing id in column {column!r}", file=path, row=line)
    raise InputError(f"id in column {column!r} must be a string or an integer, got {type(value).__name__} "
                     f"{value!r:.40}", file=path, row=line)


def arrow_ids(col: pa.Array | pa.ChunkedArray, path: str, column: str, first_row: int = 0) -> list[str]:
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_integer(t):
        col = pc.cast(col, pa.string())
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(f"id column {column!r} has type {t}; use a string or integer column", file=path)
    bad = pc.or_kleene(pc.is_null(col), pc.equal(col, ""))
    if pc.any(bad).as_py():
        raise InputError(f"empty or missing id in column {column!r}", file=path,
                         row=first_row + pc.index(bad, True).as_py())
    ids: list[str] = col.to_pylist()
    return ids


def parquet_ids(f: File, column: str) -> Iterator[tuple[int, list[str]]]:
    """(first row, ids) per chunk, reading only the id column."""
    with parquet_file(f) as pf:
        row = 0
        for batch in pf.iter_batches(batch_size=PQ_CHUNK, columns=[column]):
            yield row, arrow_ids(batch.column(0), f.path, column, first_row=row)
            row += len(batch)


def open_binary(path: str, options: dict[str, Any] | None = None) -> Any:
    if storage.is_remote(path):
        return storage.open_input(path, options)
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}", file=path) from None


def parquet_file(f: File) -> pq.ParquetFile:
    return pq.ParquetFile(storage.open_random(f.path, f.options) if storage.is_remote(f.path) else f.path)


class JsonlReader:
    def __init__(self, path: str, options: dict[str, Any] | None = None) -> None:
        self.fh = open_binary(path, options)
        self.line = self.row = 0   # physical lines and non-blank lines consumed

    def read(self, row: int, n: int, ck_offset: int, ck_line: int) -> list[tuple[int, bytes]]:
        """n non-blank lines from `row` on; seeks (to the checkpoint, or to the top) unless already there."""
        if row != self.row:
            self.fh.seek(ck_offset if row else 0)
            self.line, self.row = (ck_line if row else 0), row
        out: list[tuple[int, bytes]] = []
        line, readline = self.line, self.fh.readline
        while len(out) < n:
            raw = readline()
            if not raw:
                break
            line += 1
            if not raw.isspace():
                out.append((line, raw))
        self.line, self.row = line, self.row + len(out)
        return out

    def close(self) -> None:
        self.fh.close()


class ParquetReader:
    """Reads row ranges; jumps over whole row groups instead of decoding them."""

    def __init__(self, f: File) -> None:
        self.f = f
        self.pf = parquet_file(f)
        self.it: Iterator[pa.RecordBatch] | None = None
        self.buf: pa.RecordBatch | None = None
        self.buf_start = self.next_start = 0

    def read(self, start: int, n: int) -> pa.Table:
        pieces: list[pa.RecordBatch] = []
        pos, end, starts = start, start + n, self.f.rg_starts
        while pos < end:
            buf = self.buf
            if buf is not None and self.buf_start <= pos < self.buf_start + len(buf):
                take = min(end, self.buf_start + len(buf)) - pos
                pieces.append(buf.slice(pos - self.buf_start, take))
                pos += take
                continue
            rg = bisect_right(starts, pos) - 1
            if self.it is None or pos < self.next_start or rg > bisect_right(starts, self.next_start) - 1:
                self.it = self.pf.iter_batches(batch_size=max(n, 4096), row_groups=range(rg, len(starts)))
                self.next_start = starts[rg]
            try:
                self.buf = next(self.it)
            except StopIteration:
                raise InputError(f"the file ended before row {pos}; it changed after the scan",
                                 file=self.f.path) from None
            self.buf_start, self.next_start = self.next_start, self.next_start + len(self.buf)
        return pa.Table.from_batches(pieces)

    def close(self) -> None:
        self.pf.close()


def is_job_dir(folder: str) -> bool:
    """A pipeline output folder: parts/ beside a store, manifest or lock (a --force-new `previous-*` too)."""
    return os.path.isdir(os.path.join(folder, layout.PARTS)) and any(
        os.path.lexists(os.path.join(folder, m)) for m in layout.MARKERS)


def _outside_job_dirs(matched: list[str], pattern: str) -> list[str]:
    """Files a folder or glob matched, minus those a job's output folder holds.

    Our own outputs (results.parquet, parts/) under the input folder or a recursive glob would otherwise be
    read back as input on the next run. A job folder below the pattern's fixed part is skipped whole; when
    the input folder is itself a job's output.dir, only the job's own files are (every name state/layout.py
    lists: outputs, store, history, log, error reports, parts/, previous-*/), so the input beside them is
    still read. A file named explicitly is never filtered:
    reading another job's results.parquet on purpose is fine."""
    fixed = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    root = os.path.abspath(fixed if os.path.isdir(fixed) else os.path.dirname(fixed) or ".")
    root_is_job = is_job_dir(root)
    verdict: dict[str, bool] = {}

    def below_job(folder: str) -> bool:  # folder is strictly below root
        if folder not in verdict:
            parent = os.path.dirname(folder)
            if parent == root:
                verdict[folder] = (root_is_job and layout.is_job_folder(os.path.basename(folder))) or is_job_dir(folder)
            else:
                verdict[folder] = is_job_dir(folder) or (parent != folder and below_job(parent))
        return verdict[folder]

    def skip(p: str) -> bool:
        folder = os.path.dirname(os.path.abspath(p))
        if folder == root:
            return root_is_job and layout.is_job_file(os.path.basename(p))
        return folder.startswith(root + os.sep) and below_job(folder)

    return [p for p in matched if not skip(p)]


def _hidden(folder: str) -> list[str]:
    """The hidden files of an input folder (a folder's `*` never lists them; they are never read)."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.name.startswith(".") and e.is_file(follow_symlinks=False))


def resolve(cfg: InputConfig) -> list[File]:
    path, forced = cfg.path, (None if cfg.format == "auto" else cfg.format)
    listed: dict[str, int] | None = None  # object storage: size per URI, as the listing said
    if storage.is_remote(path):
        found, explicit = storage.expand(path, cfg.storage_options)
        matched, listed = [u for u, _ in found], dict(found)
        problem = f"no {_SUPPORTED} files {'match this pattern' if explicit else 'in this folder'}"
    elif os.path.isfile(path):
        matched, explicit = [path], True
        problem = f"unsupported file type; supported: {_SUPPORTED} (or set input.format)"
    elif os.path.isdir(path):
        matched, explicit = sorted(glob.glob(os.path.join(glob.escape(path), "*"))), False
        problem = f"the folder holds no input files ({_SUPPORTED})"
    elif any(ch in path for ch in "*?["):
        matched, explicit = sorted(glob.glob(path, recursive=True)), True
        problem = f"no {_SUPPORTED} files match this pattern"
    else:
        raise InputError("input file or folder not found (input.path is resolved against the config's folder)",
                         file=path)
    if not os.path.isfile(path):
        kept = _outside_job_dirs(matched, path)
        if len(kept) < len(matched):
            problem += " (files inside pipeline output folders are never read as input)"
        matched = kept
    files, skipped = [], _outside_job_dirs(_hidden(path), path) if listed is None and os.path.isdir(path) else []
    for p in matched:
        ext = os.path.splitext(p)[1].lower()
        # A forced format applies to whatever a path or pattern names; in a folder it picks the extensions.
        kind = (forced if explicit or ext in _FORCED_EXTENSIONS[forced] else None) if forced else _EXTENSIONS.get(ext)
        if kind and (listed is not None or os.path.isfile(p)):
            files.append(File(p, kind, options=cfg.storage_options if listed is not None else None))
        elif listed is not None or os.path.isfile(p):
            skipped.append(p)
    if files and skipped:
        # Said once, when the input is listed: a .csv dropped in the folder must not vanish without a word.
        shown = ", ".join(os.path.basename(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d file(s) that are hidden or not input files (%s): %s", path, len(skipped),
                    _SUPPORTED, shown, extra={"event": "input_files_skipped", "skipped": len(skipped)})
    if not files:
        seen = ", ".join(os.path.basename(p) for p in matched[:5]) if matched != [path] else ""
        raise InputError(problem + (f"; found only {seen}" if seen else ""), file=path)
    if all((listed[f.path] if listed is not None else os.path.getsize(f.path)) == 0 for f in files):
        raise InputError("the input is empty", file=path)
    for f, name in zip(files, _unique_names(files, remote=listed is not None)):
        f.name = name
        _probe(f)
    return files


def _unique_names(files: list[File], *, remote: bool) -> list[str]:
    """Each file's name in row ids: its base name, or its path below the files' common folder (or common
    key prefix) when two files share a base name, so bad-row ids stay unique across same-named files."""
    names = [os.path.basename(f.path) for f in files]
    if len(set(names)) == len(names):
        return names
    if remote:  # object keys: the part below the common prefix
        root = os.path.commonpath([f.path.split("://", 1)[1] for f in files])
        return [os.path.relpath(f.path.split("://", 1)[1], root) for f in files]
    root = os.path.commonpath([os.path.abspath(f.path) for f in files])
    return [os.path.relpath(os.path.abspath(f.path), root) for f in files]


def _probe(f: File) -> None:
    """Check the file opens, before any batch is read; a Parquet file's footer gives its schema, rows and
    row groups here."""
    if f.kind == "jsonl":
        open_binary(f.path, f.options).close()
        return
    try:
        with parquet_file(f) as pf:
            meta = pf.metadata
            f.schema, f.rows = pf.schema_arrow, meta.num_rows
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", file=f.path) from None
    f.rg_starts = tuple(accumulate(sizes, initial=0))[:-1]
