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

Content digests: the scan gives every batch a digest of what it holds (JSONL: each line's number and
bytes; Parquet: the file's content hash and the row range; plus the file path and the id suffixes), so
a later run can tell an unchanged batch from a changed one without reading it again. Files that change
while they are read are caught: each file's (size, mtime, inode) is taken before the scan reads it and
checked after, when batches() opens it and after every batch read from it, and a JSONL batch's bytes
are hashed again as they are read and compared with the scan's digest. Any difference raises
InputChangedError before a row of the new version is used.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from ..config import DEFAULT_BATCH_SIZE, InputConfig
from ..errors import InputChangedError, InputError, RowError
from ..vocab import InputBatch
from .digest import BatchHash, check_stamp
from .formats import (
    File,
    JsonlReader,
    ParquetReader,
    arrow_ids,
    digest8,
    json_id,
    parse,
    resolve,
)
from .scan import Index, InputScan, id_key

ID_FIELD = "__id"


class Source:
    def __init__(self, cfg: InputConfig) -> None:
        if cfg.batch_size is None:  # an InputConfig used on its own, outside a Config that sets the default
            cfg = cfg.model_copy(update={"batch_size": DEFAULT_BATCH_SIZE})
        self.cfg = cfg
        self._files = resolve(cfg)
        self.files = [f.path for f in self._files]
        self._index: Index | None = None

    def scan(self) -> InputScan:
        if self._index is None:
            self._index = Index(self.cfg, self._files)
        return self._index.scan

    def count_missing(self, ids: list[pa.ChunkedArray]) -> int:
        """How many of `ids` (e.g. the previous outputs' id column) this input no longer holds."""
        self.scan()
        assert self._index is not None
        derived = self.cfg.id_column is None
        keys = [id_key(s, derived) for col in ids for s in col.to_pylist() if s is not None]
        if not keys:
            return 0
        found = pc.is_in(pa.array(keys, pa.uint64()), value_set=self._index.id_keys)
        return len(keys) - (pc.sum(found).as_py() or 0)

    def batches(self, skip: Callable[[int], bool] | None = None) -> Iterator[InputBatch]:
        self.scan()
        st = self._index
        assert st is not None
        bs, total = self.cfg.rows_per_batch, st.scan.rows
        readers: dict[int, JsonlReader | ParquetReader] = {}
        try:
            for b in range((total + bs - 1) // bs):
                if skip is None or not skip(b):
                    yield self._batch(st, readers, b, b * bs, min(bs, total - b * bs))
        finally:
            for r in readers.values():
                r.close()

    def _batch(
        self, st: Index, readers: dict[int, JsonlReader | ParquetReader], index: int, start: int, n: int
    ) -> InputBatch:
        out = InputBatch(index, [], [], [], [], pa.table({}))
        tables: list[pa.Table] = []
        fi = bisect_right(st.starts, start) - 1
        check, last = BatchHash(), self._files[fi]
        local = start - st.starts[fi]
        g = start
        while g < start + n:
            f, take = self._files[fi], min(start + n - g, self._files[fi].rows - local)
            if take > 0:
                if fi not in readers:  # a batch only moves forward, so keep one file open at a time
                    for old in readers.values():
                        old.close()
                    readers.clear()
                    readers[fi] = JsonlReader(f.path, f.options) if f.kind == "jsonl" else ParquetReader(f)
                    check_stamp(f)
                rd, last = readers[fi], f
                check.file(f)
                try:
                    if isinstance(rd, JsonlReader):
                        # Only a batch's first segment can start mid-file, and that is where its checkpoint is.
                        lines = rd.read(local, take, st.ck_offset[index], st.ck_line[index])
                        for line, raw in lines:
                            check.line(line, raw)
                        tables.append(self._jsonl(st, out, f, lines))
                    else:
                        check.rows(f, local, take)
                        tables.append(self._parquet(st, out, f, rd.read(local, take), local))
                except (pa.ArrowException, OSError) as exc:
                    # A damaged page or a failing disk: name the file, not just the codec's complaint.
                    raise InputError(f"cannot read rows {local}-{local + take - 1} of this file ({exc}); it may be "
                                     "damaged: replace it or leave it out of input.path", file=f.path) from None
                check_stamp(f)  # read, then checked: a file rewritten meanwhile never reaches a request
                g += take
            fi, local = fi + 1, 0
        if check.digest() != st.raw_digests[index]:
            raise InputChangedError(last.path, "its rows differ from what the scan read")
        lo, hi = bisect_left(st.dup_rows, start), bisect_left(st.dup_rows, start + n)
        for i in range(lo, hi):
            out.ids[st.dup_rows[i] - start] += f"-{st.dup_ranks[i]}"
        ids = pa.array(out.ids, pa.string())
        carried = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        out.carried = carried.add_column(0, ID_FIELD, ids) if st.schema else pa.table({ID_FIELD: ids})
        return out

    def _jsonl(self, st: Index, out: InputBatch, f: File, lines: list[tuple[int, bytes]]) -> pa.Table:
        id_col = self.cfg.id_column
        rows: list[dict[str, Any]] = []
        for line, raw in lines:
            obj = parse(raw, line)
            if isinstance(obj, str):
                out.errors.append(RowError(obj, file=f.path, row=line))
                out.ids.append(f"{f.name}:{line}")
                obj = {}
            else:
                out.errors.append(None)
                rid = digest8(obj).hex() if id_col is None else json_id(obj.get(id_col), f.path, line, id_col)
                out.ids.append(rid)
            rows.append(obj)
            out.origins.append((f.path, line))
        out.rows += rows
        arrays = [_to_array([r.get(fd.name) for r in rows], fd.type, fd.name) for fd in st.schema]
        return pa.Table.from_arrays(arrays, schema=st.schema)

    def _parquet(self, st: Index, out: InputBatch, f: File, table: pa.Table, local: int) -> pa.Table:
        rows = table.to_pylist()
        id_col = self.cfg.id_column
        out.ids += [digest8(r).hex() for r in rows] if id_col is None else arrow_ids(table[id_col], f.path, id_col)
        out.rows += rows
        out.origins += [(f.path, i) for i in range(local, local + len(rows))]
        out.errors += [None] * len(rows)
        return pa.Table.from_arrays([table[fd.name].cast(fd.type) for fd in st.schema], schema=st.schema)


def _to_array(values: list[Any], t: pa.DataType, column: str) -> pa.Array:
    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        if not pa.types.is_string(t):
            raise InputError(f"column {column!r} changed since scan(); its values no longer fit {t}") from None
        return pa.array([v if v is None or type(v) is str else orjson.dumps(v).decode() for v in values], t)

