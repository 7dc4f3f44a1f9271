"""The dry run of a Ray job (`run.engine: ray`, `--dry-run`): what its output location already holds.

The local dry run reads the job's SQLite store (engines/estimate_store.py); a Ray job keeps its answers
in the journal (`_journal/<shard>/*.parquet`, state/segments.py) and its spend in `_journal/_budget.json`.
The journal's answers, a few columns of them (key, state, confidence, completion tokens, cost, cache hit;
never the raw responses), are loaded into an in-memory SQLite table shaped like the store's `responses`,
so the dry run counts what a resume would not send, the likely answer length and the cascade's likely
escalation exactly as for a local job. Nothing in the output location is created or changed; Ray is not
imported.
"""
from __future__ import annotations

import sqlite3
from typing import Any

import pyarrow.parquet as pq

from ...config import Config
from ...read import storage
from ...state.jobdir import _job_changes
from ...state.segments import JOURNAL
from .budget import spent_so_far
from .plan import MANIFEST_VERSION, RayJob
from .summary import previous_summary

COLUMNS = ("key", "state", "confidence", "completion_tokens", "cost_usd", "cache_hit")


def journal_store(cfg: Config, notes: list[str]) -> sqlite3.Connection | None:
    """The journal's answers as a read-only view, when the location holds this same Ray job."""
    root = cfg.output.dir
    known = RayJob(cfg).read_manifest()
    if known is None:
        notes.append(f"output.dir {root} holds no Ray job yet: a fresh run")
        return None
    same = known.get("fingerprint") == cfg.request_fingerprint() if known.get("version") != MANIFEST_VERSION \
        else not _job_changes(known, cfg.request_fingerprint(), cfg.request_config())
    if not same:
        notes.append(f"output.dir {root} holds a different job (endpoint, model, prompt, params or structured "
                     "changed): the run will refuse it unless --force-new, which starts over (figures below)")
        return None
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, state TEXT, confidence REAL, "
               "completion_tokens INTEGER, cost_usd REAL, cache_hit INTEGER)")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    for uri in _segments(root, cfg.output.storage_options):
        rows = _read(uri, cfg.output.storage_options)
        # The same answer may sit in several shards' folders (adopted from a donor): an ok answer wins.
        db.executemany("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "state = excluded.state, confidence = excluded.confidence, "
                       "completion_tokens = excluded.completion_tokens, cost_usd = excluded.cost_usd, "
                       "cache_hit = excluded.cache_hit WHERE excluded.state = 'ok'", rows)
    return db


def journal_spent(cfg: Config) -> float:
    """USD earlier runs of this job spent: what a resume's budget starts from, counted as the driver counts
    it (budget.spent_so_far: the budget file or, when larger, the last summary's cost_usd)."""
    return spent_so_far(cfg.output.dir, cfg.output.storage_options,
                        float(previous_summary(cfg).get("cost_usd", 0.0) or 0.0))


def _segments(root: str, options: dict[str, Any] | None) -> list[str]:
    """The committed segments (a shard's folder's Parquet files; not the row map or the budget file)."""
    base = storage.join(root, JOURNAL).rstrip("/") + "/"
    out = []
    for uri in storage.list_files(base, options):
        if "/" in uri[len(base):] and uri.endswith(".parquet"):
            out.append(uri)
    return out


def _read(uri: str, options: dict[str, Any] | None) -> list[tuple[Any, ...]]:
    fs, path = storage.filesystem(uri, options) if storage.is_remote(uri) else (None, uri)
    present = pq.read_schema(path, filesystem=fs).names
    table = pq.read_table(path, filesystem=fs, columns=[c for c in COLUMNS if c in present])
    cols = [table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in COLUMNS]
    return [(k, s, conf, tok or 0, cost or 0.0, int(bool(hit))) for k, s, conf, tok, cost, hit in zip(*cols)]
