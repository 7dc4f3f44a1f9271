"""The batch ledger: what was written, uploaded and created at the provider, kept in the job's store.

Two tables of their own on the answer store's connection (contract 5), so an intent and the answers it
leads to live in one SQLite file and one WAL:

  batch_chunks  one row per batch file: its state, the provider's file and batch ids, the last status
                and request_counts seen, the sums the queue and budget checks need, and the model its
                lines ask (a cascade's stages and the audit each have files of their own, since a Batch
                API file carries one model; NULL: the job's endpoint.model);
  batch_lines   one row per (chunk, request key): which requests a file carries and how each ended
                (NULL while in flight; ok | permanent | transient | bad_content | fatal | missing);
  batch_packs   with prompt.rows_per_request > 1, the rows of each pack line (its request key), in order;
  batch_alone   rows a pack's answer left without a usable answer, to ask again in a pack of their own.

A chunk's state only moves forward. An intent is written (and fsynced) BEFORE each step that creates
something at the provider, so after a kill -9 the next run knows what may exist there and reconciles
before it submits anything:

  writing -> ready -> uploading -> uploaded -> creating -> submitted -> collected
     |                   (reconcile: adopt the file by name, or upload again)
     |                                        (reconcile: adopt the batch by metadata, or create again)
     +-> dropped (killed while writing: nothing left this machine; the lines are rendered again)
  submitted -> rejected (the provider refused the file: run-fatal; the lines are free again)
  ready | uploaded -> split (its lines did not all fit the budget: copied into two new chunks)
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from ..state.store import Store

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS batch_chunks (
        chunk INTEGER PRIMARY KEY, state TEXT NOT NULL, path TEXT NOT NULL, lines INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0, est_tokens INTEGER NOT NULL DEFAULT 0, worst_usd REAL NOT NULL DEFAULT 0,
        file_id TEXT, batch_id TEXT, status TEXT, counts TEXT, output_file_id TEXT, error_file_id TEXT,
        intent_at REAL, updated_at REAL)""",
    """CREATE TABLE IF NOT EXISTS batch_lines (
        chunk INTEGER NOT NULL, key TEXT NOT NULL, est INTEGER NOT NULL DEFAULT 0, images INTEGER NOT NULL DEFAULT 0,
        outcome TEXT, PRIMARY KEY (chunk, key))""",
    "CREATE INDEX IF NOT EXISTS batch_lines_key ON batch_lines (key)",
    # Provider files (input, output, error) still to delete once their answers are committed
    # (batch.delete_files); a table of its own, so a store written before it existed reads as it was.
    "CREATE TABLE IF NOT EXISTS batch_cleanup (file_id TEXT PRIMARY KEY, chunk INTEGER NOT NULL)",
    # prompt.rows_per_request > 1: the rows each pack line carries (a pack's key is fixed by its rows, so
    # this is keyed by the pack, not the chunk), each row's share of the prompt and the shared prefix, so
    # a later run can split the pack's answer without the pack in memory.
    """CREATE TABLE IF NOT EXISTS batch_packs (
        pack TEXT NOT NULL, pos INTEGER NOT NULL, row TEXT NOT NULL, chars INTEGER NOT NULL,
        shared INTEGER NOT NULL, PRIMARY KEY (pack, pos))""",
    "CREATE INDEX IF NOT EXISTS batch_packs_row ON batch_packs (row)",
    # Rows a pack's answer left without a usable answer: asked again alone (recorded with the outcome of
    # the line that left them, so a kill between the two cannot lose it).
    "CREATE TABLE IF NOT EXISTS batch_alone (row TEXT PRIMARY KEY)",
]
# Columns added to batch_chunks after it first shipped (a store written before reads them as NULL).
_ADDED = {"model": "TEXT"}

# Chunks whose lines are spoken for: written, at the provider, or waiting to be collected.
LIVE = ("ready", "uploading", "uploaded", "creating", "submitted")
_WRITING_OR_LIVE = ("writing", *LIVE)  # a line of the chunk being written is spoken for too
_LIVE_MARKS = ",".join("?" * len(_WRITING_OR_LIVE))
AT_PROVIDER = ("submitted",)


@dataclass(slots=True)
class Chunk:
    chunk: int
    state: str
    path: str
    lines: int
    bytes: int
    est_tokens: int
    worst_usd: float
    file_id: str | None
    batch_id: str | None
    status: str | None
    counts: dict[str, int]
    output_file_id: str | None
    error_file_id: str | None
    intent_at: float | None
    model: str | None = None  # the model its lines ask; None: the job's endpoint.model

    @property
    def name(self) -> str:
        return f"chunk-{self.chunk:06d}"


_COLS = "chunk, state, path, lines, bytes, est_tokens, worst_usd, file_id, batch_id, status, counts, " \
        "output_file_id, error_file_id, intent_at, model"


class Ledger:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db: sqlite3.Connection = store.connection
        for statement in _SCHEMA:
            self.db.execute(statement)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(batch_chunks)")}
        for name, kind in _ADDED.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE batch_chunks ADD COLUMN {name} {kind}")
        job = store.get_meta("batch_job_id")
        if job is None:
            # Names this job's files and batches at the provider (metadata, filenames); random, so two
            # folders running the same config never adopt each other's batches.
            job = secrets.token_hex(8)
            store.set_meta("batch_job_id", job)
        self.job_id = job

    # -- chunks --------------------------------------------------------------------------------------

    def new_chunk(self, folder: str, model: str | None = None) -> Chunk:
        row = self.db.execute("SELECT coalesce(max(chunk), 0) + 1 FROM batch_chunks").fetchone()
        n = int(row[0])
        path = os.path.join(folder, f"chunk-{n:06d}.jsonl")
        self.db.execute("INSERT INTO batch_chunks (chunk, state, path, updated_at, model) "
                        "VALUES (?, 'writing', ?, ?, ?)",
                        (n, path, time.time(), model))
        self._durable()
        return self.get(n)

    def add_lines(self, chunk: int, lines: Iterable[tuple[str, int, int]]) -> None:
        """(key, estimated prompt tokens, images) of lines just written to the chunk's file."""
        self._many("INSERT OR IGNORE INTO batch_lines (chunk, key, est, images) VALUES (?, ?, ?, ?)",
                   [(chunk, k, e, i) for k, e, i in lines])

    def get(self, chunk: int) -> Chunk:
        row = self.db.execute(f"SELECT {_COLS} FROM batch_chunks WHERE chunk = ?", (chunk,)).fetchone()
        return _chunk(row)

    def chunks(self, states: Iterable[str] | None = None) -> list[Chunk]:
        if states is None:
            rows = self.db.execute(f"SELECT {_COLS} FROM batch_chunks ORDER BY chunk").fetchall()
        else:
            wanted = list(states)
            marks = ",".join("?" * len(wanted))
            rows = self.db.execute(f"SELECT {_COLS} FROM batch_chunks WHERE state IN ({marks}) ORDER BY chunk",
                                   wanted).fetchall()
        return [_chunk(r) for r in rows]

    def update(self, chunk: int, *, durable: bool = False, **fields: Any) -> None:
        """Change a chunk's row; `durable` fsyncs it before returning (an intent before a provider call)."""
        if "counts" in fields:
            fields["counts"] = orjson.dumps(fields["counts"] or {}).decode()
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE batch_chunks SET {sets} WHERE chunk = ?", (*fields.values(), chunk))
        if durable:
            self._durable()
        else:
            self.store.touched()

    def drop(self, chunk: int, *, state: str = "dropped") -> None:
        """A chunk never submitted (killed while written, or split to fit the budget): forget its lines, so
        they are rendered (or carried) again."""
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM batch_lines WHERE chunk = ?", (chunk,))
        self.db.execute("UPDATE batch_chunks SET state = ?, updated_at = ? WHERE chunk = ?",
                        (state, time.time(), chunk))
        self.db.execute("COMMIT")
        self._durable()

    # -- lines ---------------------------------------------------------------------------------------

    def spoken_for(self, keys: list[str]) -> set[str]:
        """Those of `keys` that a live chunk (or the one being written) carries with no outcome yet."""
        return set(self.carriers(keys))

    def carriers(self, keys: list[str]) -> dict[str, int]:
        """{key: the live chunk (or the one being written) that carries it with no outcome yet}."""
        return dict(self._where_in(
            "SELECT l.key, l.chunk FROM batch_lines l JOIN batch_chunks c USING (chunk) WHERE l.key IN ({marks}) "
            f"AND l.outcome IS NULL AND c.state IN ({_LIVE_MARKS})", keys, _WRITING_OR_LIVE))

    def spoken_rows(self, rows: list[str]) -> set[str]:
        """Those of `rows` that a pack line of a live chunk (or the one being written) carries, with no
        outcome yet."""
        return set(self.row_carriers(rows))

    def row_carriers(self, rows: list[str]) -> dict[str, int]:
        """{row: the live chunk (or the one being written) whose pack line carries it with no outcome yet}."""
        return dict(self._where_in(
            "SELECT p.row, l.chunk FROM batch_packs p JOIN batch_lines l ON l.key = p.pack JOIN batch_chunks c "
            f"USING (chunk) WHERE p.row IN ({{marks}}) AND l.outcome IS NULL AND c.state IN ({_LIVE_MARKS})",
            rows, _WRITING_OR_LIVE))

    def add_packs(self, packs: list[tuple[str, list[tuple[str, int]], int]]) -> None:
        """(pack key, [(row key, chars)] in pack order, shared chars) of packs about to be written."""
        self._many("INSERT OR IGNORE INTO batch_packs (pack, pos, row, chars, shared) VALUES (?, ?, ?, ?, ?)",
                   [(key, pos, row, chars, shared) for key, rows, shared in packs
                    for pos, (row, chars) in enumerate(rows)])

    def pack(self, key: str) -> tuple[list[tuple[str, int]], int] | None:
        """The rows (key, chars) of the pack line `key` in pack order and its shared chars; None: no pack."""
        found = self.db.execute("SELECT row, chars, shared FROM batch_packs WHERE pack = ? ORDER BY pos",
                                (key,)).fetchall()
        return ([(r, c) for r, c, _ in found], int(found[0][2])) if found else None

    def alone(self, rows: list[str]) -> set[str]:
        """Those of `rows` to ask in a pack of their own."""
        return {r for (r,) in self._where_in("SELECT row FROM batch_alone WHERE row IN ({marks})", rows)}

    def lines(self, chunk: int) -> Iterator[tuple[str, int, int, str | None]]:
        yield from self.db.execute("SELECT key, est, images, outcome FROM batch_lines WHERE chunk = ?", (chunk,))

    def attempts(self, key: str) -> dict[str, int]:
        """How often this request was in a batch file, by outcome ('sent' counts every line)."""
        out = {"sent": 0}
        for outcome, n in self.db.execute("SELECT outcome, count(*) FROM batch_lines WHERE key = ? GROUP BY outcome",
                                          (key,)):
            out["sent"] += n
            if outcome:
                out[outcome] = n
        return out

    def set_outcomes(self, chunk: int, outcomes: list[tuple[str, str]], alone: Iterable[str] = ()) -> None:
        """How lines ended, and (packs) the rows they leave to ask alone, in one transaction."""
        with self._transaction():
            self.db.executemany("UPDATE batch_lines SET outcome = ? WHERE chunk = ? AND key = ?",
                                [(o, chunk, k) for k, o in outcomes])
            self.db.executemany("INSERT OR IGNORE INTO batch_alone (row) VALUES (?)", [(r,) for r in alone])

    def mark_unanswered(self, chunk: int) -> int:
        """Lines of a finished batch that neither file answered; returns how many."""
        cur = self.db.execute("UPDATE batch_lines SET outcome = 'missing' WHERE chunk = ? AND outcome IS NULL",
                              (chunk,))
        self.store.touched()
        return cur.rowcount

    def in_flight(self) -> tuple[int, float]:
        """Estimated prompt tokens and worst-case cost of the batches at the provider, not yet collected."""
        row = self.db.execute("SELECT coalesce(sum(est_tokens), 0), coalesce(sum(worst_usd), 0) FROM batch_chunks "
                              "WHERE state IN ('creating', 'submitted')").fetchone()
        return int(row[0]), float(row[1])

    # -- provider files to delete -----------------------------------------------------------------------

    def add_cleanup(self, chunk: int, file_ids: Iterable[str | None]) -> None:
        self._many("INSERT OR IGNORE INTO batch_cleanup (file_id, chunk) VALUES (?, ?)",
                   [(f, chunk) for f in file_ids if f])
        self._durable()

    def cleanup(self) -> list[str]:
        """Provider files whose answers are committed, to delete (batch.delete_files)."""
        return [f for (f,) in self.db.execute("SELECT file_id FROM batch_cleanup ORDER BY chunk, file_id")]

    def cleaned(self, file_ids: Iterable[str]) -> None:
        self._many("DELETE FROM batch_cleanup WHERE file_id = ?", [(f,) for f in file_ids])

    def _where_in(self, sql: str, keys: list[str], extra: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql` whose `IN ({marks})` is `keys`, asked 500 at a time (SQLite caps a statement's
        parameters); `extra` are the parameters that follow the marks."""
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            yield from self.db.execute(sql.replace("{marks}", ",".join("?" * len(part))), (*part, *extra))

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One transaction for many rows (autocommit would make each row a commit of its own)."""
        with self._transaction():
            self.db.executemany(sql, rows)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The statements of the block commit together, or (an exception, a Ctrl-C) none of them."""
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.store.touched()

    def _durable(self) -> None:
        self.store.touched()
        self.store.sync()


def _chunk(row: tuple[Any, ...]) -> Chunk:
    values = list(row)
    values[10] = orjson.loads(values[10]) if values[10] else {}
    return Chunk(*values)


def read_chunks(store: Store) -> list[Chunk]:
    """For `pipeline status` (a read-only store): the ledger's chunks, or none when this is no batch job."""
    db = store.connection
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(batch_chunks)")}
        cols = ", ".join(c if c in have else "NULL" for c in _COLS.split(", "))  # a store from before a column
        rows = db.execute(f"SELECT {cols} FROM batch_chunks ORDER BY chunk").fetchall()
    except sqlite3.OperationalError:  # no batch_chunks table: not a batch job
        return []
    return [_chunk(r) for r in rows]
