"""The input scan: one bounded-memory pass that counts rows, proves ids unique, infers JSONL types and
records where each batch starts and what it holds (its content digest); see reader.py for the whole story."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..config import InputConfig
from ..errors import InputError
from .digest import BatchHash, check_stamp, file_hash, stamp
from .formats import (
    PQ_CHUNK,
    File,
    digest8,
    json_id,
    jsonl_objects,
    open_binary,
    parquet_file,
    parquet_ids,
    parse,
)

_MASK = (1 << 64) - 1
_TYPE_SAMPLE = 4096   # JSONL rows per type-inference chunk in scan()
_MAX_NAMED = 10


@dataclass
class InputScan:
    files: list[str]
    rows: int
    columns: list[str]
    digests: list[bytes]   # per batch, in order
    carried_types: dict[str, str] = field(default_factory=dict)  # the carried columns' inferred types


class Index:
    """What Source.scan() learns in its one pass, and what batches() needs to find and name rows.

    Per file its first global row (`starts`); per batch the byte offset and line count before its first
    row (`ck_offset`, `ck_line`; JSONL only); for derived ids the rows that get a suffix (`dup_rows`,
    ascending) and the suffix numbers (`dup_ranks`); the carried columns' `schema`. The 8-byte keys
    used to find duplicates are dropped when the scan ends.
    """

    def __init__(self, cfg: InputConfig, files: list[File]) -> None:
        self.cfg, self.files = cfg, files
        self.total = 0
        self.keys = array("Q")
        self.columns: dict[str, None] = {}
        self.types: dict[str, pa.DataType] = {}
        self.ck_offset, self.ck_line = array("Q"), array("Q")
        self.starts: list[int] = []
        self.missing_id: tuple[str, int] | None = None
        self.dup_rows, self.dup_ranks = array("Q"), array("I")
        self.hashes: list[BatchHash] = []
        self.raw_digests: list[bytes] = []
        self.scan = self._run()
        self.schema = pa.schema([(c, self.types.get(c, pa.null())) for c in cfg.columns])
        self.scan.carried_types = {fd.name: str(fd.type) for fd in self.schema}

    def _run(self) -> InputScan:
        cfg = self.cfg
        for f in self.files:
            self.starts.append(self.total)
            f.stamp = stamp(f)
            if f.kind == "jsonl":
                self._jsonl(f)
            else:
                try:
                    self._parquet(f)
                except (pa.ArrowException, OSError) as exc:
                    # A damaged data page (the footer read fine): name the file, not just the codec's complaint.
                    raise InputError(f"cannot read this Parquet file ({exc}); it may be damaged: replace it or leave "
                                     "it out of input.path", file=f.path) from None
            check_stamp(f)  # the scan's counts and ids must come from one version of the file
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
        # Kept (8 bytes a row) to tell which rows of earlier outputs left the input (Source.count_missing).
        self.id_keys = pc.unique(pa.Array.from_buffers(pa.uint64(), len(self.keys), [None, pa.py_buffer(self.keys)]))
        self.keys = array("Q")
        if runs and cfg.id_column is not None:
            self._name_duplicates({key for key, _ in runs})
        elif runs:
            pairs = sorted((row, rank) for _, rows in runs for rank, row in enumerate(rows[1:], 2))
            self.dup_rows.extend(r for r, _ in pairs)
            self.dup_ranks.extend(k for _, k in pairs)
        self.raw_digests = [h.digest() for h in self.hashes]
        self.hashes = []
        return InputScan([f.path for f in self.files], self.total, list(self.columns), self._digests())

    def _digests(self) -> list[bytes]:
        """Batch digests including the id suffixes of derived duplicate ids (known only after the pass)."""
        bs = self.cfg.rows_per_batch
        extra: dict[int, Any] = {}  # blake2b objects (hashlib names no public type for them)
        for row, rank in zip(self.dup_rows, self.dup_ranks):
            h = extra.setdefault(row // bs, hashlib.blake2b(self.raw_digests[row // bs], digest_size=8))
            h.update(row.to_bytes(8, "little") + rank.to_bytes(4, "little"))
        return [extra[b].digest() if b in extra else d for b, d in enumerate(self.raw_digests)]

    def _checkpoints(self, n: int, offset: int, line: int) -> None:
        """A seek point for every batch that starts among the next n rows."""
        bs = self.cfg.rows_per_batch
        for _ in range(self.total + (-self.total) % bs, self.total + n, bs):
            self.ck_offset.append(offset)
            self.ck_line.append(line)

    def _jsonl(self, f: File) -> None:
        id_col, carried, keys, bs = self.cfg.id_column, self.cfg.columns, self.keys, self.cfg.rows_per_batch
        limit = self.cfg.limit
        seen = set(self.columns)
        samples: dict[str, list[Any]] = {c: [] for c in carried}
        offset, line, first = 0, 0, self.total
        cur = self.hashes[-1] if self.total % bs else None
        if cur is not None:
            cur.file(f)  # a batch that began in the previous file goes on in this one
        with open_binary(f.path, f.options) as fh:
            for raw in fh:
                line += 1
                offset += len(raw)
                if raw.isspace():
                    continue
                if self.total == limit:
                    break
                if self.total % bs == 0:
                    self._checkpoints(1, offset - len(raw), line - 1)
                    cur = BatchHash()
                    cur.file(f)
                    self.hashes.append(cur)
                assert cur is not None
                # Inlined BatchHash.line (the hot loop): a line number only where the numbering jumps.
                if line != cur.next:
                    cur.gap(line)
                cur.h.update(raw)
                cur.next = line + 1
                self.total += 1
                obj = parse(raw, line)
                if isinstance(obj, str):
                    keys.append(hash(f"{f.name}:{line}") & _MASK)
                    continue
                if not seen.issuperset(obj):
                    self.columns.update((k, None) for k in obj if k not in seen)
                    seen.update(obj)
                if id_col is None:
                    keys.append(int.from_bytes(digest8(obj), "big"))
                elif (value := obj.get(id_col)) is None or value == "":
                    self.missing_id = self.missing_id or (f.path, line)
                else:
                    keys.append(hash(json_id(value, f.path, line, id_col)) & _MASK)
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

    def _parquet(self, f: File) -> None:
        id_col, schema = self.cfg.id_column, f.schema
        assert schema is not None
        self.columns.update((name, None) for name in schema.names if name not in self.columns)
        for c in self.cfg.columns:
            if c in schema.names:
                before, here = self.types.get(c), schema.field(c).type
                merged = _merge(before, here)
                if not all(_castable(t, merged) for t in (before, here) if t is not None):
                    # Found now, not as a crash halfway through writing the outputs.
                    raise InputError(f"carried column {c!r} is {here} here but {before} in an earlier input file; "
                                     "input.columns needs one type across files: convert the files, or drop "
                                     f"{c!r} from input.columns", file=f.path)
                self.types[c] = merged
        if id_col is not None and id_col not in schema.names:
            raise InputError(f"id column {id_col!r} not found; available columns: {', '.join(schema.names)}",
                             file=f.path)
        if self.cfg.limit is not None:
            f.rows = min(f.rows, max(0, self.cfg.limit - self.total))
        self._checkpoints(f.rows, 0, 0)
        self._hash_parquet(f)
        first = len(self.keys)
        if id_col is None:
            with parquet_file(f) as pf:
                for batch in pf.iter_batches(batch_size=PQ_CHUNK):
                    self.keys.extend(int.from_bytes(digest8(r), "big") for r in batch.to_pylist())
        else:
            for _, ids in parquet_ids(f, id_col):
                self.keys.extend(hash(s) & _MASK for s in ids)
        del self.keys[first + f.rows:]  # rows past input.limit
        self.total += f.rows

    def _hash_parquet(self, f: File) -> None:
        """Feed the file's batches' digests: its content hash and each batch's row range in it."""
        f.content_hash = file_hash(f)
        start, bs = self.total, self.cfg.rows_per_batch
        if start % bs and f.rows:
            self.hashes[-1].file(f)
        pos = 0
        while pos < f.rows:
            take = min(bs - (start + pos) % bs, f.rows - pos)
            if (start + pos) % bs == 0:
                self.hashes.append(BatchHash())
                self.hashes[-1].file(f)
            self.hashes[-1].rows(f, pos, take)
            pos += take

    def _name_duplicates(self, candidates: set[int]) -> None:
        """The narrow second pass: where are the ids whose hashes repeat? Most inputs never get here."""
        id_col = self.cfg.id_column
        assert id_col is not None
        where: dict[str, list[str]] = {}
        for f in self.files:
            if f.kind == "parquet":
                found = ((f"row {i}", s) for row, ids in parquet_ids(f, id_col) for i, s in enumerate(ids, row))
            else:
                found = ((f"line {line}", f"{f.name}:{line}" if isinstance(obj, str) else
                          json_id(obj[id_col], f.path, line, id_col)) for line, obj in jsonl_objects(f.path, f.options))
            for place, s in islice(found, f.rows):  # rows past input.limit are not part of the input
                if hash(s) & _MASK in candidates:
                    where.setdefault(s, []).append(f"{f.path} {place}")
        dups = [(s, places) for s, places in where.items() if len(places) > 1]
        if dups:
            named = "; ".join(f"{s!r} at {' and '.join(p[:3])}" for s, p in dups[:_MAX_NAMED])
            more = f" (and {len(dups) - _MAX_NAMED} more)" if len(dups) > _MAX_NAMED else ""
            raise InputError(f"{len(dups)} duplicate ids in id column {id_col!r}: {named}{more}; ids must be "
                             "unique (or drop input.id_column to derive ids from the row content)",
                             file=self.cfg.path)


def id_key(rid: str, derived: bool) -> int:
    """The scan's 8-byte key of an id: the content hash a derived id was made from (its hex, without a
    "-N" suffix), else the id's own hash. Within one process, as the scan's keys are."""
    head = rid[:16]
    if derived and len(head) == 16 and (len(rid) == 16 or rid[16] == "-"):
        try:
            return int(head, 16)
        except ValueError:
            pass
    return hash(rid) & _MASK


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


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    try:
        pa.array([], type=src).cast(dst)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False
    return True
