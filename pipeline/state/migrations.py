"""Named, recorded schema migrations for the SQLite stores (as simonw/llm does it).

A migration is a function `mNNN_what(db)`; the list lives next to the schema it builds (store.py's
`MIGRATIONS`, which later work appends to, never reorders). `apply` runs, in one transaction, the ones
whose name is not yet in the store's `_migrations` table and records each; so every migration runs
once per store, and a store shared by several jobs (cache.dir) is upgraded by one writer. Migrations
are written to be idempotent too (CREATE ... IF NOT EXISTS, backfills guarded), because stores made
before this table existed have no record of what they already hold.

A store holding a migration this version does not know was written by a newer version: reading it
could silently misread it, so it is refused (`StateVersionError`, exit 2) on open, read-only included.
"""
from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence

from ..errors import StateVersionError

Migration = Callable[[sqlite3.Connection], None]


def apply(db: sqlite3.Connection, migrations: Sequence[Migration], path: str) -> list[str]:
    """Apply the migrations this store has not had yet; returns their names."""
    db.execute("BEGIN IMMEDIATE")  # one writer at a time creates or upgrades
    try:
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        done = applied(db)
        refuse_newer(done, migrations, path)
        new = []
        for migration in migrations:
            if migration.__name__ not in done:
                migration(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (migration.__name__, time.time()))
                new.append(migration.__name__)
        db.execute("COMMIT")
    except BaseException:
        # On a full disk SQLite has already rolled back: a failing ROLLBACK must not hide the real error.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return new


def applied(db: sqlite3.Connection) -> set[str]:
    """Names of the migrations this store has had (none recorded: a store from before they were)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = '_migrations'").fetchone() is None:
        return set()
    return {name for (name,) in db.execute("SELECT name FROM _migrations")}


def refuse_newer(done: set[str], migrations: Sequence[Migration], path: str) -> None:
    unknown = sorted(done - {m.__name__ for m in migrations})
    if unknown:
        raise StateVersionError(
            f"{path} was written by a newer version of the pipeline (it has schema changes this version does "
            f"not know: {', '.join(unknown)}); run that version, or move the folder aside to start over")
