"""The answer journal for engines without a local disk: append-only Parquet segments in the job's output
location (a local folder or an s3:// / gs:// prefix), one folder per shard of input rows.

Layout (docs/ray.md): `<output.dir>/_journal/<shard>/<writer>-<seq:06d>.parquet`, `<shard>` the shard's
content name (16 hex characters; engines/ray/plan.py) or a labelled block's id. A writer is one
worker process lifetime (a random id), so no two processes ever write the same object. A segment is
committed as one whole object (a rename locally, a single complete PUT on object storage), so readers
see all of its records or none, and `put` returns only once its segment is committed: an answer counts
after it is durable, never before.

Lookups are per shard: a worker starting a shard reads only that shard's folder and those of the shards
that held its rows before (`known`), so memory is bounded by a few shards' answers, not the job's, and a
shard that Ray runs again after a worker died is answered from the journal instead of being paid for
again. `adopt` copies answers a shard reused from another folder into its own, as one segment.
"""
from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import defaultdict
from dataclasses import fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..read import storage
from ..vocab import FINAL_STATES, Record
from .store import scrubbed

JOURNAL = "_journal"
# Group-commit interval. Requests hold their concurrency slot until their answer is committed, so this
# is added to every request's time in its slot: short, or concurrency / (latency + COMMIT_S) caps the
# rate. Object stores take thousands of PUTs/s per prefix; a segment per 50 ms per active shard is cheap.
COMMIT_S = 0.05
_FIELDS = [f for f in fields(Record) if f.name != "raw"]  # raw bodies stay out: outputs never need them
_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _arrow_type(annotation: str) -> pa.DataType:
    base = annotation.replace(" | None", "").strip()
    return _TYPES.get(base, pa.string())


SCHEMA = pa.schema([(f.name, _arrow_type(str(f.type))) for f in _FIELDS])


def shard_folder(root: str, shard: str) -> str:
    return storage.join(root, JOURNAL, shard)


def encode(records: list[Record]) -> bytes:
    table = pa.Table.from_pylist([{f.name: getattr(r, f.name) for f in _FIELDS} for r in records], schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def decode(data: bytes) -> list[Record]:
    return [Record(**row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


class Journal:
    """One worker's writer: group commit per shard every `interval_s` (or `max_records`), plus lookups.

    Duck-types the part of state.store.Store that dispatch uses (`put`, `set_meta`, `path`)."""

    def __init__(self, root: str, options: dict[str, Any] | None = None, *, interval_s: float = COMMIT_S,
                 max_records: int = 512) -> None:
        self.root, self.options = root, options
        self.path = storage.join(root, JOURNAL)
        self.writer = uuid.uuid4().hex[:12]
        self.interval_s, self.max_records = interval_s, max_records
        self.routes: dict[str, set[str]] = defaultdict(set)   # request key -> shards waiting for it
        self._pending: dict[str, list[tuple[Record, asyncio.Future[None]]]] = defaultdict(list)
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self.meta: dict[str, str] = {}

    def route(self, key: str, shard: str) -> None:
        """Answers to `key` belong to `shard` (several shards when rows repeat a prompt)."""
        self.routes[key].add(shard)

    def release(self, keys: list[str], shard: str) -> None:
        for key in keys:
            shards = self.routes.get(key)
            if shards is not None:
                shards.discard(shard)
                if not shards:
                    del self.routes[key]

    def set_meta(self, name: str, value: str) -> None:
        self.meta[name] = value

    async def put(self, record: Record) -> None:
        """Return once a segment holding the record is committed in every shard that asked for it."""
        if not record.created_at:
            record.created_at = time.time()
        loop = asyncio.get_running_loop()
        waits = []
        for shard in self.routes.get(record.key) or ():
            fut: asyncio.Future[None] = loop.create_future()
            self._pending[shard].append((record, fut))
            waits.append(fut)
        if not waits:
            raise RuntimeError(f"no shard is waiting for request {record.key}")
        if sum(len(v) for v in self._pending.values()) >= self.max_records:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.interval_s, self._flush)
        await asyncio.gather(*waits)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batches, self._pending = self._pending, defaultdict(list)
        for shard, items in batches.items():
            self._seq += 1
            task = asyncio.get_running_loop().create_task(self._commit(shard, self._seq, items))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _commit(self, shard: str, seq: int, items: list[tuple[Record, asyncio.Future[None]]]) -> None:
        uri = f"{shard}/{self.writer}-{seq:06d}.parquet"
        try:  # every failure below must reach the waiters, or their requests would wait forever
            uri = storage.join(shard_folder(self.root, shard), f"{self.writer}-{seq:06d}.parquet")
            await asyncio.to_thread(self._write, uri, [r for r, _ in items])
        except Exception as exc:  # every waiter learns it; nothing of this segment counts
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(OSError(f"cannot commit {uri}: {exc}"))
            return
        for _, fut in items:
            if not fut.done():
                fut.set_result(None)

    def _write(self, uri: str, records: list[Record]) -> None:
        storage.write_bytes(uri, encode([scrubbed(r) for r in records]), self.options, root=self.root)

    def known(self, shards: list[str], *, retry_failed: bool = False) -> dict[str, Record]:
        """The final answers committed in these shards' folders, by request key (an ok answer wins)."""
        keep = {"ok"} if retry_failed else FINAL_STATES
        found: dict[str, Record] = {}
        for shard in shards:
            for uri in storage.list_files(shard_folder(self.root, shard), self.options):
                if not uri.endswith(".parquet"):  # a local writer's temporary file
                    continue
                for r in decode(storage.read_bytes(uri, self.options)):
                    if r.state in keep and (r.key not in found or r.state == "ok"):
                        found[r.key] = r
        return found

    def adopt(self, shard: str, records: list[Record]) -> None:
        """Commit answers found in other shards' folders into this one's (one segment, written whole)."""
        name = f"{self.writer}-adopted-{uuid.uuid4().hex[:8]}.parquet"  # called off the loop: no shared seq
        self._write(storage.join(shard_folder(self.root, shard), name), records)
