"""Input files as streaming batches, with a stable, unique id per row.

`Source(cfg.input)` resolves the files (a file, a glob, or a folder's *.parquet/*.jsonl/*.ndjson,
sorted) and checks what is cheap to check. `scan()` is one bounded-memory pass: it counts rows, checks
the id and carried columns, proves ids unique (8-byte hashes sorted in Arrow; a second, narrow pass
only to name duplicates), infers JSONL types for the carried table and records where each batch
starts. `batches(skip)` streams fixed-size batches across files and jumps straight to any batch, so a
resumed job neither parses nor decodes what it skips. It runs `scan()` first if that has not run.

Ids: the `input.id_column` value as str (string or integer values). Without one, the first 16 hex
chars of sha256(orjson.dumps(row, OPT_SORT_KEYS)); identical rows get "-2", "-3"... in input order.
A bad JSONL line (not JSON, not UTF-8, not an object) is a row with an error and the id
"<file name>:<line>" (the path below the inputs' common folder when base names clash).
Origins: (path, 1-based line) for JSONL, (path, 0-based row) for Parquet.
"""
from __future__ import annotations

import glob
import hashlib
import os
from array import array
from base64 import b64encode
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import InputConfig
from .errors import InputError, RowError

ID_FIELD = "__id"
_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_FORCED_EXTENSIONS = {"parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".ndjson", ".json")}
_SUPPORTED = ".parquet, .jsonl, .ndjson"
_MASK = (1 << 64) - 1
_TYPE_SAMPLE = 4096   # JSONL rows per type-inference chunk in scan()
_PQ_CHUNK = 65_536    # rows per Arrow batch when scanning Parquet
_MAX_NAMED = 10


@dataclass
class InputBatch:
    index: int
    rows: list[dict[str, Any]]
    ids: list[str]
    origins: list[tuple[str, int]]
    errors: list[RowError | None]
    carried: pa.Table


@dataclass
class InputScan:
    files: list[str]
    rows: int
    columns: list[str]
    fingerprint: str


@dataclass
class _File:
    path: str
    kind: str
    name: str = ""
    rows: int = 0
    schema: pa.Schema | None = None
    rg_starts: tuple[int, ...] = ()


class Source:
    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg
        self._files = _resolve(cfg)
        self.files = [f.path for f in self._files]
        self._index: _Index | None = None

    def scan(self) -> InputScan:
        if self._index is None:
            self._index = _Index(self.cfg, self._files)
        return self._index.scan

    def batches(self, skip: Callable[[int], bool] | None = None) -> Iterator[InputBatch]:
        self.scan()
        st = self._index
        assert st is not None
        bs, total = self.cfg.batch_size, st.scan.rows
        readers: dict[int, _JsonlReader | _ParquetReader] = {}
        try:
            for b in range((total + bs - 1) // bs):
                if skip is None or not skip(b):
                    yield self._batch(st, readers, b, b * bs, min(bs, total - b * bs))
        finally:
            for r in readers.values():
                r.close()

    def _batch(
        self, st: _Index, readers: dict[int, _JsonlReader | _ParquetReader], index: int, start: int, n: int
    ) -> InputBatch:
        out = InputBatch(index, [], [], [], [], pa.table({}))
        tables: list[pa.Table] = []
        fi = bisect_right(st.starts, start) - 1
        local = start - st.starts[fi]
        g = start
        while g < start + n:
            f, take = self._files[fi], min(start + n - g, self._files[fi].rows - local)
            if take > 0:
                if fi not in readers:  # a batch only moves forward, so keep one file open at a time
                    for old in readers.values():
                        old.close()
                    readers.clear()
                    readers[fi] = _JsonlReader(f.path) if f.kind == "jsonl" else _ParquetReader(f)
                rd = readers[fi]
                if isinstance(rd, _JsonlReader):
                    # Only a batch's first segment can start mid-file, and that is where its checkpoint is.
                    tables.append(self._jsonl(st, out, f, rd.read(local, take, st.ck_offset[index], st.ck_line[index])))
                else:
                    tables.append(self._parquet(st, out, f, rd.read(local, take), local))
                g += take
            fi, local = fi + 1, 0
        lo, hi = bisect_left(st.dup_rows, start), bisect_left(st.dup_rows, start + n)
        for i in range(lo, hi):
            out.ids[st.dup_rows[i] - start] += f"-{st.dup_ranks[i]}"
        ids = pa.array(out.ids, pa.string())
        carried = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        out.carried = carried.add_column(0, ID_FIELD, ids) if st.schema else pa.table({ID_FIELD: ids})
        return out

    def _jsonl(self, st: _Index, out: InputBatch, f: _File, lines: list[tuple[int, bytes]]) -> pa.Table:
        id_col = self.cfg.id_column
        rows: list[dict[str, Any]] = []
        for line, raw in lines:
            obj = _parse(raw, line)
            if isinstance(obj, str):
                out.errors.append(RowError(obj, file=f.path, row=line))
                out.ids.append(f"{f.name}:{line}")
                obj = {}
            else:
                out.errors.append(None)
                rid = _digest8(obj).hex() if id_col is None else _json_id(obj.get(id_col), f.path, line, id_col)
                out.ids.append(rid)
            rows.append(obj)
            out.origins.append((f.path, line))
        out.rows += rows
        arrays = [_to_array([r.get(fd.name) for r in rows], fd.type, fd.name) for fd in st.schema]
        return pa.Table.from_arrays(arrays, schema=st.schema)

    def _parquet(self, st: _Index, out: InputBatch, f: _File, table: pa.Table, local: int) -> pa.Table:
        rows = table.to_pylist()
        id_col = self.cfg.id_column
        out.ids += [_digest8(r).hex() for r in rows] if id_col is None else _arrow_ids(table[id_col], f.path, id_col)
        out.rows += rows
        out.origins += [(f.path, i) for i in range(local, local + len(rows))]
        out.errors += [None] * len(rows)
        return pa.Table.from_arrays([table[fd.name].cast(fd.type) for fd in st.schema], schema=st.schema)


class _Index:
    """What Source.scan() learns in its one pass, and what batches() needs to find and name rows.

    Per file its first global row (`starts`); per batch the byte offset and line count before its first
    row (`ck_offset`, `ck_line`; JSONL only); for derived ids the rows that get a suffix (`dup_rows`,
    ascending) and the suffix numbers (`dup_ranks`); the carried columns' `schema`. The 8-byte keys
    used to find duplicates are dropped when the scan ends.
    """

    def __init__(self, cfg: InputConfig, files: list[_File]) -> None:
        self.cfg, self.files = cfg, files
        self.total = 0
        self.keys = array("Q")
        self.columns: dict[str, None] = {}
        self.types: dict[str, pa.DataType] = {}
        self.ck_offset, self.ck_line = array("Q"), array("Q")
        self.starts: list[int] = []
        self.missing_id: tuple[str, int] | None = None
        self.dup_rows, self.dup_ranks = array("Q"), array("I")
        self.scan = self._run()
        self.schema = pa.schema([(c, self.types.get(c, pa.null())) for c in cfg.columns])

    def _run(self) -> InputScan:
        cfg = self.cfg
        for f in self.files:
            self.starts.append(self.total)
            self._jsonl(f) if f.kind == "jsonl" else self._parquet(f)
        if self.total == 0:
            raise InputError("the input has no rows (only empty files or blank lines)", file=cfg.path)
        available = f"available columns: {', '.join(self.columns) or '(none)'}"
        if cfg.id_column is not None and cfg.id_column not in self.columns:
            raise InputError(f"id column {cfg.id_column!r} not found; {available}", file=cfg.path)
        if self.missing_id:
            raise InputError(f"empty or missing id in column {cfg.id_column!r}", file=self.missing_id[0],
                             row=self.missing_id[1])
        missing = [c for c in cfg.columns if c not in self.columns]
        if missing:
            raise InputError(f"input.columns {missing} not found; {available}", file=cfg.path)
        runs = _duplicate_runs(self.keys)
        self.keys = array("Q")
        if runs and cfg.id_column is not None:
            self._name_duplicates({key for key, _ in runs})
        elif runs:
            pairs = sorted((row, rank) for _, rows in runs for rank, row in enumerate(rows[1:], 2))
            self.dup_rows.extend(r for r, _ in pairs)
            self.dup_ranks.extend(k for _, k in pairs)
        hasher = hashlib.sha256()
        for f in self.files:
            stat = os.stat(f.path)
            hasher.update(f"{f.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return InputScan([f.path for f in self.files], self.total, list(self.columns), hasher.hexdigest()[:16])

    def _checkpoints(self, n: int, offset: int, line: int) -> None:
        """A seek point for every batch that starts among the next n rows."""
        bs = self.cfg.batch_size
        for _ in range(self.total + (-self.total) % bs, self.total + n, bs):
            self.ck_offset.append(offset)
            self.ck_line.append(line)

    def _jsonl(self, f: _File) -> None:
        id_col, carried, keys, bs = self.cfg.id_column, self.cfg.columns, self.keys, self.cfg.batch_size
        seen = set(self.columns)
        samples: dict[str, list[Any]] = {c: [] for c in carried}
        offset, line, first = 0, 0, self.total
        with _open(f.path) as fh:
            for raw in fh:
                line += 1
                offset += len(raw)
                if raw.isspace():
                    continue
                if self.total % bs == 0:
                    self._checkpoints(1, offset - len(raw), line - 1)
                self.total += 1
                obj = _parse(raw, line)
                if isinstance(obj, str):
                    keys.append(hash(f"{f.name}:{line}") & _MASK)
                    continue
                if not seen.issuperset(obj):
                    self.columns.update((k, None) for k in obj if k not in seen)
                    seen.update(obj)
                if id_col is None:
                    keys.append(int.from_bytes(_digest8(obj), "big"))
                elif (value := obj.get(id_col)) is None or value == "":
                    self.missing_id = self.missing_id or (f.path, line)
                else:
                    keys.append(hash(_json_id(value, f.path, line, id_col)) & _MASK)
                for c in carried:
                    samples[c].append(obj.get(c))
                if carried and len(samples[carried[0]]) >= _TYPE_SAMPLE:
                    self._infer(samples)
        self._infer(samples)
        f.rows = self.total - first

    def _infer(self, samples: dict[str, list[Any]]) -> None:
        for c, values in samples.items():
            if values:
                try:
                    t = pa.array(values).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    t = pa.string()  # mixed types: carried as JSON text
                self.types[c] = _merge(self.types.get(c), t)
                values.clear()

    def _parquet(self, f: _File) -> None:
        id_col, schema = self.cfg.id_column, f.schema
        assert schema is not None
        self.columns.update((name, None) for name in schema.names if name not in self.columns)
        for c in self.cfg.columns:
            if c in schema.names:
                self.types[c] = _merge(self.types.get(c), schema.field(c).type)
        if id_col is not None and id_col not in schema.names:
            raise InputError(f"id column {id_col!r} not found; available columns: {', '.join(schema.names)}",
                             file=f.path)
        self._checkpoints(f.rows, 0, 0)
        if id_col is None:
            with pq.ParquetFile(f.path) as pf:
                for batch in pf.iter_batches(batch_size=_PQ_CHUNK):
                    self.keys.extend(int.from_bytes(_digest8(r), "big") for r in batch.to_pylist())
        else:
            for _, ids in _parquet_ids(f, id_col):
                self.keys.extend(hash(s) & _MASK for s in ids)
        self.total += f.rows

    def _name_duplicates(self, candidates: set[int]) -> None:
        """The narrow second pass: where are the ids whose hashes repeat? Most inputs never get here."""
        id_col = self.cfg.id_column
        assert id_col is not None
        where: dict[str, list[str]] = {}
        for f in self.files:
            if f.kind == "parquet":
                found = ((f"row {i}", s) for row, ids in _parquet_ids(f, id_col) for i, s in enumerate(ids, row))
            else:
                found = ((f"line {line}", f"{f.name}:{line}" if isinstance(obj, str) else
                          _json_id(obj[id_col], f.path, line, id_col)) for line, obj in _jsonl_objects(f.path))
            for place, s in found:
                if hash(s) & _MASK in candidates:
                    where.setdefault(s, []).append(f"{f.path} {place}")
        dups = [(s, places) for s, places in where.items() if len(places) > 1]
        if dups:
            named = "; ".join(f"{s!r} at {' and '.join(p[:3])}" for s, p in dups[:_MAX_NAMED])
            more = f" (and {len(dups) - _MAX_NAMED} more)" if len(dups) > _MAX_NAMED else ""
            raise InputError(f"{len(dups)} duplicate ids in id column {id_col!r}: {named}{more}; ids must be "
                             "unique (or drop input.id_column to derive ids from the row content)",
                             file=self.cfg.path)


def _duplicate_runs(keys: array[int]) -> list[tuple[int, list[int]]]:
    """(key, rows in input order) for every key that occurs more than once; the sort runs in Arrow."""
    if len(keys) < 2:
        return []
    arr = pa.Array.from_buffers(pa.uint64(), len(keys), [None, pa.py_buffer(keys)])
    order = pc.sort_indices(arr)  # stable, so equal keys keep input order
    ordered = arr.take(order)
    same = pc.indices_nonzero(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).to_pylist()
    runs: list[tuple[int, list[int]]] = []
    prev = -2
    for p in same:
        if p != prev + 1:
            runs.append((ordered[p].as_py(), [order[p].as_py()]))
        runs[-1][1].append(order[p + 1].as_py())
        prev = p
    return runs


def _merge(a: pa.DataType | None, b: pa.DataType) -> pa.DataType:
    if a is None or a == b:
        return b
    try:
        s = pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive")
        return s.field("x").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        return pa.string()


def _to_array(values: list[Any], t: pa.DataType, column: str) -> pa.Array:
    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        if not pa.types.is_string(t):
            raise InputError(f"column {column!r} changed since scan(); its values no longer fit {t}") from None
        return pa.array([v if v is None or type(v) is str else orjson.dumps(v).decode() for v in values], t)


def _parse(raw: bytes, line: int) -> dict[str, Any] | str:
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


def _jsonl_objects(path: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with _open(path) as fh:
        for line, raw in enumerate(fh, 1):
            if not raw.isspace():
                yield line, _parse(raw, line)


def _json_default(value: Any) -> str:
    # Parquet values orjson cannot serialize (bytes, Decimal); only hashed, so any stable text will do.
    return b64encode(bytes(value)).decode() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def _digest8(obj: dict[str, Any]) -> bytes:
    """The first 8 bytes of the row's content hash: its derived id (as hex) and its dedup key."""
    opts = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    return hashlib.sha256(orjson.dumps(obj, default=_json_default, option=opts)).digest()[:8]


def _json_id(value: Any, path: str, line: int, column: str) -> str:
    if type(value) is str and value:
        return value
    if type(value) is int:
        return str(value)
    if value is None or value == "":
        raise InputError(f"empty or missing id in column {column!r}", file=path, row=line)
    raise InputError(f"id in column {column!r} must be a string or an integer, got {type(value).__name__} "
                     f"{value!r:.40}", file=path, row=line)


def _arrow_ids(col: pa.Array | pa.ChunkedArray, path: str, column: str, first_row: int = 0) -> list[str]:
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


def _parquet_ids(f: _File, column: str) -> Iterator[tuple[int, list[str]]]:
    """(first row, ids) per chunk, reading only the id column."""
    with pq.ParquetFile(f.path) as pf:
        row = 0
        for batch in pf.iter_batches(batch_size=_PQ_CHUNK, columns=[column]):
            yield row, _arrow_ids(batch.column(0), f.path, column, first_row=row)
            row += len(batch)


def _open(path: str) -> Any:
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or exc}", file=path) from None


class _JsonlReader:
    def __init__(self, path: str) -> None:
        self.fh = _open(path)
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


class _ParquetReader:
    """Reads row ranges; jumps over whole row groups instead of decoding them."""

    def __init__(self, f: _File) -> None:
        self.f = f
        self.pf = pq.ParquetFile(f.path)
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


def _resolve(cfg: InputConfig) -> list[_File]:
    path, forced = cfg.path, (None if cfg.format == "auto" else cfg.format)
    if os.path.isfile(path):
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
    files = []
    for p in matched:
        ext = os.path.splitext(p)[1].lower()
        # A forced format applies to whatever a path or pattern names; in a folder it picks the extensions.
        kind = (forced if explicit or ext in _FORCED_EXTENSIONS[forced] else None) if forced else _EXTENSIONS.get(ext)
        if kind and os.path.isfile(p):
            files.append(_File(p, kind))
    if not files:
        seen = ", ".join(os.path.basename(p) for p in matched[:5]) if matched != [path] else ""
        raise InputError(problem + (f"; found only {seen}" if seen else ""), file=path)
    if all(os.path.getsize(f.path) == 0 for f in files):
        raise InputError("the input is empty", file=path)
    names = [os.path.basename(f.path) for f in files]
    if len(set(names)) < len(names):  # bad-row ids must stay unique across same-named files
        root = os.path.commonpath([os.path.abspath(f.path) for f in files])
        names = [os.path.relpath(os.path.abspath(f.path), root) for f in files]
    for f, name in zip(files, names):
        f.name = name
        if f.kind == "jsonl":
            _open(f.path).close()
            continue
        try:
            with pq.ParquetFile(f.path) as pf:
                meta = pf.metadata
                f.schema, f.rows = pf.schema_arrow, meta.num_rows
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"not a readable Parquet file ({exc})", file=f.path) from None
        f.rg_starts = tuple(accumulate(sizes, initial=0))[:-1]
    return files
