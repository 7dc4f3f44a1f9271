"""The dry run's read-only view of what a job already holds: its store in output.dir (when it is this same
job) and the shared cache (cache.dir). Nothing is created or written: a store no run is writing is opened
with SQLite's `immutable`, so not even -wal/-shm files appear; a live one is read in read-only mode.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..config import Config
from ..state import migrations
from ..state.jobdir import JobDir
from ..state.store import MIGRATIONS, connect
from ..vocab import FINAL_STATES

if TYPE_CHECKING:
    from .estimate import Estimate


def job_store(cfg: Config, notes: list[str]) -> sqlite3.Connection | None:
    """The job's store (read-only), when output.dir holds this same job (the input may have changed); a
    Ray job's journal seen as one (engines/ray/dryrun.py)."""
    if cfg.run.engine == "ray":
        from .ray.dryrun import journal_store
        return journal_store(cfg, notes)
    jobdir = JobDir(cfg.output.dir)
    if not jobdir.path.exists():
        notes.append(f"output.dir {jobdir.path} does not exist yet: a fresh run")
        return None
    known = jobdir.identity()
    if known is not None and known.get("fingerprint") != cfg.request_fingerprint():
        notes.append(f"output.dir {jobdir.path} holds a different job (endpoint, model, prompt, params or "
                     "structured changed): the run will refuse it unless --force-new, which starts over "
                     "(figures below)")
        return None
    return open_readonly(jobdir.store_path)


def open_readonly(path: str) -> sqlite3.Connection | None:
    if not os.path.exists(path):
        return None
    # Without a -wal file no run is writing, and `immutable` reads without creating -wal/-shm files;
    # with one, a run is live (or died): plain read-only mode sees its latest commits.
    mode = "ro" if os.path.exists(path + "-wal") else "ro&immutable=1"
    db = connect(path, mode)
    migrations.refuse_newer(migrations.applied(db), MIGRATIONS, path)  # a newer store: not ours to read
    return db


def meta(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def final_states(db: sqlite3.Connection | None, keys: Iterable[str]) -> dict[str, str]:
    """key -> state for the keys a resume would not request again."""
    if db is None:
        return {}
    unique = list(keys)
    out: dict[str, str] = {}
    for i in range(0, len(unique), 500):
        chunk = unique[i:i + 500]
        sql = f"SELECT key, state FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
        out.update((k, s) for k, s in db.execute(sql, chunk) if s in FINAL_STATES)
    return out


def likely_output(store: sqlite3.Connection | None, cache: sqlite3.Connection | None) -> tuple[float | None, str]:
    for db, where in ((store, "this job's output.dir"), (cache, "the shared cache")):
        if db is None:
            continue
        n, mean = db.execute("SELECT count(*), avg(completion_tokens) FROM responses WHERE state = 'ok'").fetchone()
        if n:
            return float(mean), f"mean of {n:,} answers in {where}"
    return None, "unknown until some rows are answered (run a sample first, e.g. --set input.path=sample.jsonl)"


def spent_before(est: Estimate, cfg: Config) -> float:
    """USD earlier runs of this job spent (what a resume's budget starts from)."""
    if cfg.run.engine == "ray":
        from .ray.dryrun import journal_spent
        return journal_spent(cfg) if est.rows_done_ok + est.rows_done_failed else 0.0
    store = open_readonly(JobDir(cfg.output.dir).store_path) if est.rows_done_ok + est.rows_done_failed else None
    if store is None:
        return 0.0
    try:
        row = store.execute("SELECT coalesce(sum(cost_usd), 0) FROM responses WHERE cache_hit = 0").fetchone()
        return float(row[0])
    finally:
        store.close()
