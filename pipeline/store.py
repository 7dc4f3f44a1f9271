"""Durable record of every paid response, keyed by request key.

One SQLite database in WAL mode per output directory (and optionally one shared cache directory).
Why SQLite: a commit is an append to the WAL file, so a record is in the OS the moment `put` returns
and survives kill -9 at any instant; a torn last transaction is discarded by SQLite itself on open;
lookups by key need no index of our own in memory (bounded memory on a 1M-row resume); and
`pipeline status` can read it from another process while a run writes.

Commits are grouped per event-loop tick (`put` waits for the commit that includes its record), and the
WAL is fsynced by a background thread at least every `fsync_interval_s`, so durability against power
loss costs one fsync a second, not one per response.

Record states: ok | permanent | bad_content | transient (retries exhausted). A later record for the same
key replaces an earlier one (e.g. a failure that `--retry-failed` turned into a success).
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

SCHEMA_VERSION = 1

# States a resume does not request again; `--retry-failed` narrows this to "ok" only.
FINAL_STATES = frozenset({"ok", "permanent", "bad_content"})


@dataclass(slots=True)
class Record:
    """Everything the outputs need about one request, plus the raw body to re-parse if ever needed."""

    key: str
    state: str
    attempts: int = 1
    status: int | None = None
    error_class: str | None = None
    message: str | None = None
    content: str | None = None
    output_json: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    provider: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    tool_calls_json: str | None = None
    logprobs_json: str | None = None
    cache_hit: bool = False
    created_at: float = 0.0
    raw: bytes | None = None


_COLUMNS = [f.name for f in fields(Record)]
_INSERT = f"INSERT OR REPLACE INTO responses ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT_NO_RAW = ", ".join(c for c in _COLUMNS if c != "raw")


class Store:
    def __init__(self, path: str, *, fsync_interval_s: float = 1.0, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        # check_same_thread=False: the fsync thread only touches the WAL file, never this connection.
        self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: commits append to the WAL without fsync (the OS has the data); we fsync on a timer.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS responses (
                    key TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER, status INTEGER,
                    error_class TEXT, message TEXT, content TEXT, output_json TEXT, finish_reason TEXT,
                    model TEXT, provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
                    cost_usd REAL, latency_s REAL, ttft_s REAL, tool_calls_json TEXT, logprobs_json TEXT,
                    cache_hit INTEGER, created_at REAL, raw BLOB);
                CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
                """
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._pending: list[tuple[Record, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._dirty = False
        self._fsync_interval = fsync_interval_s
        self._stop = threading.Event()
        self._fsync_thread: threading.Thread | None = None
        if not readonly:
            self._fsync_thread = threading.Thread(target=self._fsync_loop, name="store-fsync", daemon=True)
            self._fsync_thread.start()

    # -- writing -------------------------------------------------------------------------------------

    async def put(self, record: Record) -> None:
        """Return once the record is committed (in the OS); commits are shared by all puts of a tick."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((record, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        await fut

    def put_now(self, records: Iterable[Record]) -> None:
        """Synchronous commit, for copying records (cache hits) and tests."""
        self._write([r for r in records])

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._write([r for r, _ in batch])
        except Exception as exc:  # disk full, I/O error: every waiter must learn it, nothing counts as done
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    def _write(self, records: list[Record]) -> None:
        now = time.time()
        rows = []
        for r in records:
            if not r.created_at:
                r.created_at = now
            rows.append(tuple(getattr(r, c) for c in _COLUMNS))
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._dirty = True

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
        self._dirty = True

    def get_meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    # -- reading -------------------------------------------------------------------------------------

    def get_many(self, keys: Iterable[str], *, with_raw: bool = False) -> dict[str, Record]:
        """Records for those of `keys` that have one; bounded by the number of keys asked."""
        cols = ", ".join(_COLUMNS) if with_raw else _SELECT_NO_RAW
        names = _COLUMNS if with_raw else [c for c in _COLUMNS if c != "raw"]
        unique = list(dict.fromkeys(keys))
        out: dict[str, Record] = {}
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT {cols} FROM responses WHERE key IN ({marks})", chunk):
                rec = Record(**dict(zip(names, row)))
                rec.cache_hit = bool(rec.cache_hit)
                out[rec.key] = rec
        return out

    def totals(self) -> dict[str, Any]:
        """Counts by state, tokens and cost, last write time: what `pipeline status` shows."""
        by_state = dict(self._db.execute("SELECT state, count(*) FROM responses GROUP BY state").fetchall())
        p, c, cost, last = self._db.execute(
            "SELECT coalesce(sum(prompt_tokens),0), coalesce(sum(completion_tokens),0),"
            " coalesce(sum(cost_usd),0), max(created_at) FROM responses WHERE cache_hit = 0"
        ).fetchone()
        return {"by_state": by_state, "prompt_tokens": p, "completion_tokens": c, "cost_usd": cost, "last_write": last}

    def iter_records(self) -> Iterator[Record]:
        for row in self._db.execute(f"SELECT {_SELECT_NO_RAW} FROM responses"):
            yield Record(**dict(zip([c for c in _COLUMNS if c != "raw"], row)))

    # -- durability ----------------------------------------------------------------------------------

    def _fsync_loop(self) -> None:
        wal = self.path + "-wal"
        while not self._stop.wait(self._fsync_interval):
            self._fsync(wal)

    def _fsync(self, wal: str) -> None:
        if not self._dirty:
            return
        self._dirty = False
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """fsync now (end of run, before reporting success)."""
        self._fsync(self.path + "-wal")

    def close(self) -> None:
        self._stop.set()
        if self._fsync_thread is not None:
            self._fsync_thread.join(timeout=5)
        if not self._readonly:
            self._flush()
            self.sync()
        self._db.close()
