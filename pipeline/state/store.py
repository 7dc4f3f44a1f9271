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

The schema is built by named migrations (MIGRATIONS below, applied once each and recorded in the
`_migrations` table; see migrations.py), and a store written by a newer version is refused on open.

Two small tables keep start-up and `pipeline status` independent of the job's size (a 1M-row store is
~1 GB, and summing it costs a second warm and far more cold):
  tally   counts, tokens and cost per (state, cache_hit), kept by triggers in the same transaction as
          the responses they count, so they can never disagree after a crash;
  parts   per finished batch: rows ok / failed / failed transiently / failed after a request, written
          right after the batch's part files, so a resume knows which batches to skip or reopen
          without opening a thousand Parquet footers.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from ..common import redact, safefs
from ..common.diagnosis import damaged_store_message
from ..errors import StoreDamagedError
from ..vocab import Record
from . import migrations
from .migrations import Migration

_COLUMNS = [f.name for f in fields(Record)]
_INSERT = f"INSERT OR REPLACE INTO responses ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT_NO_RAW = ", ".join(c for c in _COLUMNS if c != "raw")

# No conflict clause inside the triggers: the firing INSERT OR REPLACE would impose its own on them.
_TALLY_ADD = """
    INSERT INTO tally (state, cache_hit) SELECT new.state, coalesce(new.cache_hit, 0) WHERE NOT EXISTS
        (SELECT 1 FROM tally WHERE state = new.state AND cache_hit = coalesce(new.cache_hit, 0));
    UPDATE tally SET n = n + 1, prompt_tokens = prompt_tokens + coalesce(new.prompt_tokens, 0),
        completion_tokens = completion_tokens + coalesce(new.completion_tokens, 0),
        cost_usd = cost_usd + coalesce(new.cost_usd, 0), last_write = max(coalesce(last_write, 0), new.created_at)
    WHERE state = new.state AND cache_hit = coalesce(new.cache_hit, 0);
"""
_TALLY_SUB = """
    UPDATE tally SET n = n - 1, prompt_tokens = prompt_tokens - coalesce(old.prompt_tokens, 0),
        completion_tokens = completion_tokens - coalesce(old.completion_tokens, 0),
        cost_usd = cost_usd - coalesce(old.cost_usd, 0)
    WHERE state = old.state AND cache_hit = coalesce(old.cache_hit, 0);
"""
MIGRATIONS: list[Migration] = []  # in order; append new ones at the end, never change an applied one


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_responses(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS responses (
        key TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER, status INTEGER,
        error_class TEXT, message TEXT, content TEXT, output_json TEXT, finish_reason TEXT,
        model TEXT, provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
        cost_usd REAL, latency_s REAL, ttft_s REAL, tool_calls_json TEXT, logprobs_json TEXT,
        cache_hit INTEGER, created_at REAL, raw BLOB)""")
    db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")


@migration
def m002_tally_and_parts(db: sqlite3.Connection) -> None:
    had_tally = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tally'").fetchone() is not None
    db.execute("""CREATE TABLE IF NOT EXISTS tally (
        state TEXT NOT NULL, cache_hit INTEGER NOT NULL, n INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0, last_write REAL, PRIMARY KEY (state, cache_hit))""")
    db.execute(f"CREATE TRIGGER IF NOT EXISTS tally_add AFTER INSERT ON responses BEGIN {_TALLY_ADD} END")
    db.execute(f"CREATE TRIGGER IF NOT EXISTS tally_sub AFTER DELETE ON responses BEGIN {_TALLY_SUB} END")
    db.execute("""CREATE TABLE IF NOT EXISTS parts (
        batch INTEGER PRIMARY KEY, ok INTEGER NOT NULL, failed INTEGER NOT NULL,
        transient INTEGER NOT NULL, request_failed INTEGER NOT NULL)""")
    if not had_tally:  # a store from before the tally (or a new one): count what is already there, once
        db.execute(
            "INSERT INTO tally SELECT state, coalesce(cache_hit, 0), count(*), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0), max(created_at)"
            " FROM responses GROUP BY state, coalesce(cache_hit, 0)"
        )


@migration
def m003_cache_confidence_usage(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
    for name, sql_type in (("cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
                           ("cache_write_tokens", "INTEGER NOT NULL DEFAULT 0"),
                           ("confidence", "REAL"), ("confidence_json", "TEXT"), ("usage_note", "TEXT")):
        if name not in have:  # idempotent, like every migration (see migrations.py)
            db.execute(f"ALTER TABLE responses ADD COLUMN {name} {sql_type}")


SCHEMA_VERSION = len(MIGRATIONS)  # also in meta, for a quick look; the _migrations table decides


def scrubbed(r: Record) -> Record:
    """The record with its network text (message, content, raw) scrubbed of secrets, in place: whatever
    path an answer came by, a secret is never kept on disk (send/redact.py)."""
    if redact.active():
        r.message, r.content = redact.scrub_any(r.message), redact.scrub_any(r.content)
        r.raw = redact.scrub_any(r.raw)
    return r


@dataclass(slots=True, frozen=True)
class PartCounts:
    """One finished batch: rows answered, failed, failed with retries exhausted, failed after a request."""

    ok: int
    failed: int
    failed_transient: int
    request_failed: int


def connect(path: str, mode: str | None = None, **kw: Any) -> sqlite3.Connection:
    """The one way this package opens an SQLite file by path (`mode`: None, "ro", "ro&immutable=1").

    SQLite opens by path and follows links, also read-only (and a read-only WAL reader may create -shm):
    a link planted at the store or its side files is refused here, before any connection, for every
    opener (the run, the identity check, dry run, status, show, report)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        safefs.check_not_link(path + suffix)
    return sqlite3.connect(f"file:{path}" + (f"?mode={mode}" if mode else ""), uri=True, **kw)


class Store:
    def __init__(self, path: str, *, fsync_interval_s: float = 1.0, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        # check_same_thread=False: the fsync thread only touches the WAL file, never this connection.
        self._db = connect(path, "ro" if readonly else None, isolation_level=None, check_same_thread=False,
                           timeout=30)
        try:
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL: commits append to the WAL without fsync (the OS has the data); we fsync on a timer.
                self._db.execute("PRAGMA synchronous=NORMAL")
                # A REPLACE must fire the delete trigger for the row it replaces, or the tally double-counts.
                self._db.execute("PRAGMA recursive_triggers=ON")
                self._create_schema()
            else:
                migrations.refuse_newer(migrations.applied(self._db), MIGRATIONS, path)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise StoreDamagedError(damaged_store_message(path, str(exc))) from None
            raise
        self._pending: list[tuple[Record, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._dirty = False
        self._fsync_interval = fsync_interval_s
        self._stop = threading.Event()
        self._fsync_thread: threading.Thread | None = None
        if not readonly:
            self._fsync_thread = threading.Thread(target=self._fsync_loop, name="store-fsync", daemon=True)
            self._fsync_thread.start()

    def _create_schema(self) -> None:
        migrations.apply(self._db, MIGRATIONS, self.path)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

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
            r = scrubbed(r)
            rows.append(tuple(getattr(r, c) for c in _COLUMNS))
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except BaseException:
            # On a full disk SQLite has already rolled back; a failing ROLLBACK ("cannot rollback - no
            # transaction is active") must not hide the error that says what happened.
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        self._dirty = True

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
        self._dirty = True

    def get_meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    @property
    def connection(self) -> sqlite3.Connection:
        """For modules that keep tables of their own in this store (CREATE TABLE IF NOT EXISTS); call
        `touched()` after writing so the next fsync covers the write."""
        return self._db

    def touched(self) -> None:
        self._dirty = True

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

    def cache_totals(self) -> tuple[int, int]:
        """(cached, cache-write) prompt tokens of the answers paid for in this job (cache hits not counted)."""
        row = self._db.execute("SELECT coalesce(sum(cached_tokens), 0), coalesce(sum(cache_write_tokens), 0) "
                               "FROM responses WHERE cache_hit = 0").fetchone()
        return int(row[0]), int(row[1])

    def totals(self) -> dict[str, Any]:
        """Counts by state, tokens and cost (cache hits are counted, not charged), last write time: what
        `pipeline status` shows and where a resumed budget starts. Reads the tally, not the responses."""
        try:
            rows = self._db.execute(
                "SELECT state, cache_hit, n, prompt_tokens, completion_tokens, cost_usd, last_write FROM tally"
            ).fetchall()
        except sqlite3.OperationalError:  # a version-1 store opened read-only: sum it the slow way
            rows = self._db.execute(
                "SELECT state, cache_hit, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens),"
                " 0), coalesce(sum(cost_usd), 0), max(created_at) FROM responses GROUP BY state, cache_hit"
            ).fetchall()
        by_state: dict[str, int] = {}
        p = c = 0
        cost = 0.0
        last = None
        for state, cache_hit, n, pt, ct, usd, when in rows:
            if n:
                by_state[state] = by_state.get(state, 0) + n
            if not cache_hit:
                p, c, cost = p + pt, c + ct, cost + usd
            if when is not None and n:
                last = when if last is None else max(last, when)
        return {"by_state": by_state, "prompt_tokens": p, "completion_tokens": c, "cost_usd": max(cost, 0.0),
                "last_write": last}

    # -- the part index ------------------------------------------------------------------------------

    def put_part(self, batch: int, *, ok: int, failed: int, failed_transient: int, request_failed: int) -> None:
        """Record a finished batch (after its part files are in place); a later record replaces it."""
        self._db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?, ?)",
                         (batch, ok, failed, failed_transient, request_failed))
        self._dirty = True

    def answered_since(self, since: float) -> dict[str, int]:
        """Answers committed at or after `since` (not cache hits), by state: what a run stored so far, for
        `pipeline status` while it runs or after it was killed. One scan of the small columns."""
        rows = self._db.execute(
            "SELECT state, count(*) FROM responses WHERE created_at >= ? AND NOT coalesce(cache_hit, 0) "
            "GROUP BY state", (since,)).fetchall()
        return {state: n for state, n in rows}

    def parts(self) -> dict[int, PartCounts]:
        """The finished batches this store knows of (one small row each)."""
        try:
            rows = self._db.execute("SELECT batch, ok, failed, transient, request_failed FROM parts").fetchall()
        except sqlite3.OperationalError:  # a version-1 store opened read-only
            return {}
        return {b: PartCounts(ok, failed, transient, rf) for b, ok, failed, transient, rf in rows}

    def forget_parts(self, batches: Iterable[int]) -> None:
        """Drop index rows of parts that are gone (batches the input no longer has)."""
        rows = [(b,) for b in batches]
        if rows:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM parts WHERE batch = ?", rows)
            self._db.execute("COMMIT")
            self._dirty = True

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
