"""A Ray job's state from its output location alone (local folder or object-store prefix), for
`pipeline status`, the summary and `pipeline.load`; never imports Ray.

Read: `ray-manifest.json` (this input's shards, in order), the parts folders (footers only), the lease
(is a driver running, and who), `ray-status.json` (the running driver's heartbeat: workers alive, rows,
cost so far), `summary.json` and `history.jsonl`.
"""
from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ...read import storage

MANIFEST = "ray-manifest.json"
STATUS_FILE = "ray-status.json"
RESULTS, FAILURES = "results.parquet", "failures.parquet"
STALE_S = 60.0  # a heartbeat older than this is from a driver that is gone


def is_ray_job(root: str, options: dict[str, Any] | None = None) -> bool:
    """The location holds a Ray job (its manifest), local folder or object-store prefix."""
    try:
        return _json(storage.join(root, MANIFEST), options) is not None
    except OSError:
        return False


def _json(uri: str, options: dict[str, Any] | None) -> Any:
    try:
        return orjson.loads(storage.read_bytes(uri, options))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def _table(uri: str, options: dict[str, Any] | None, columns: list[str]) -> Any:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, options)
        return pq.read_table(path, filesystem=fs, columns=columns)
    return pq.read_table(uri, columns=columns)


def part_uris(root: str, options: dict[str, Any] | None, folder: str, names: set[str] | None = None) -> list[str]:
    out = []
    for uri in storage.list_files(storage.join(root, folder), options):
        base = uri.rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".parquet") and (names is None or base[5:-8] in names):
            out.append(uri)
    return out


def read_parts(root: str, options: dict[str, Any] | None, folder: str, names: set[str] | None,
               columns: Collection[str]) -> pa.Table | None:
    """The parts' `columns` (those they have) as one table; None when there is no part."""
    tables = []
    for uri in part_uris(root, options, folder, names):
        fs, path = storage.filesystem(uri, options) if storage.is_remote(uri) else (None, uri)
        present = pq.read_schema(path, filesystem=fs).names
        tables.append(pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in present]))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def count_rows(root: str, options: dict[str, Any] | None, folder: str,
               names: set[str] | None = None) -> tuple[int, dict[str, int]]:
    """Rows in a parts folder (footers only) and, for failures, rows per error class."""
    total, classes = 0, dict[str, int]()
    for uri in part_uris(root, options, folder, names):
        table = _table(uri, options, ["error_class"] if folder == FAILURES else [])
        total += table.num_rows
        if folder == FAILURES:
            for value in table["error_class"].to_pylist():
                classes[value] = classes.get(value, 0) + 1
    return total, classes


def ray_status(root: str, options: dict[str, Any] | None = None, *, last_runs: int = 5) -> dict[str, Any]:
    """The keys of the local `job_status` (reporting/status.py), plus shards and workers alive."""
    from .invocation import read_history
    from .lease import Lease
    manifest = _json(storage.join(root, MANIFEST), options) or {}
    names = list(manifest.get("shards") or [])
    results = part_uris(root, options, RESULTS, set(names))
    succeeded, _ = count_rows(root, options, RESULTS, set(names))
    failed, _ = count_rows(root, options, FAILURES, set(names))
    summary = _json(storage.join(root, "summary.json"), options) or {}
    newest = Lease(root, options).newest()
    held = newest[1] if newest else {}
    running = bool(held) and not held.get("released") and float(held.get("expires_at", 0)) > time.time()
    beat = _json(storage.join(root, STATUS_FILE), options) or {}
    fresh = running and time.time() - float(beat.get("updated_at", 0)) < STALE_S
    rows_total = int(manifest.get("rows_total", 0))
    if running:
        state = "running"
    elif summary:
        state = "finished" if summary.get("exit_code") in (0, 1) else str(summary.get("stopped") or "stopped")
    else:
        state = "not running"
    cost = float(beat.get("job_cost_usd", summary.get("cost_usd", 0.0)) if fresh else summary.get("cost_usd", 0.0))
    return {
        "engine": "ray", "out_dir": root, "name": manifest.get("name"), "state": state, "this_run": None,
        "rows_total": rows_total, "rows_done": succeeded, "rows_failed": failed,
        "rows_pending": max(0, rows_total - succeeded - failed),
        "shards_total": len(names), "shards_done": len(results),
        "workers_alive": int(beat.get("workers_alive", 0)) if fresh else 0,
        "responses_stored": {},
        "prompt_tokens": int(summary.get("prompt_tokens", 0)),
        "completion_tokens": int(summary.get("completion_tokens", 0)),
        "cost_usd": round(cost, 6),
        "last_update": max(filter(None, [manifest.get("updated"), beat.get("updated_at") if fresh else None]),
                           default=None),
        "running": running, "pid": held.get("pid") if running else None, "host": held.get("host") if running else None,
        "finished": state == "finished", "resume_command": manifest.get("command"), "batches": [],
        "last_runs": read_history(root, options, last=last_runs),
    }
