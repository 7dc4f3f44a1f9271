"""`pipeline status OUT_DIR|CONFIG`: progress of a job and its last runs, read safely while another
process runs it."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from ..common.parts import done_parts, part_number
from ..common.terminal import printable
from ..errors import EXIT_FAILED_ROWS, EXIT_OK, UsageError
from ..ops import history
from ..state.jobdir import JobDir, count_part
from ..state.store import PartCounts, Store

LAST_RUNS = 5


def resolve_job(target: str) -> str:
    """An output folder as given, or the output.dir of a config file (YAML/JSON)."""
    if os.path.isfile(target):
        from ..config import load_config

        return load_config(target).output.dir
    return target


def _storage_options(target: str) -> dict[str, Any] | None:
    """output.storage_options of a config file given as the target (a bare s3:// URI uses the environment)."""
    if os.path.isfile(target):
        from ..config import load_config

        return load_config(target).output.storage_options
    return None


def _rows(jobdir: JobDir, names: list[str], index: dict[int, PartCounts]) -> tuple[int, int]:
    """Rows answered and failed in this run's batches: complete parts (counted by the store's index, or
    from a part's own files when a kill came first) and the partial parts a stop left."""
    complete = done_parts(jobdir.parts)
    succeeded = failed = 0
    for name in names:
        if name in complete:
            counts = index.get(part_number(name)) or count_part(jobdir.parts, name)
            succeeded, failed = succeeded + counts.ok, failed + counts.failed
            continue
        for kind in ("pr", "pf"):
            path = jobdir.parts / f"{name}.{kind}.parquet"
            if path.exists():
                rows = pq.ParquetFile(path).metadata.num_rows
                succeeded, failed = (succeeded + rows, failed) if kind == "pr" else (succeeded, failed + rows)
    return succeeded, failed


def _summary(jobdir: JobDir) -> tuple[dict[str, Any] | None, float | None]:
    path = jobdir.path / "summary.json"
    if not path.exists():
        return None, None
    try:
        return orjson.loads(path.read_bytes()), path.stat().st_mtime
    except orjson.JSONDecodeError:
        return None, path.stat().st_mtime


def job_status(target: str) -> dict[str, Any]:
    out_dir = resolve_job(target)
    from ..engines.ray.status import is_ray_job, ray_status  # never imports Ray
    options = _storage_options(target)
    if is_ray_job(out_dir, options):
        return ray_status(out_dir, options, last_runs=LAST_RUNS)
    jobdir = JobDir(out_dir)
    manifest = jobdir.read_manifest()
    owner = jobdir.owner()
    if manifest is None and not Path(jobdir.store_path).exists() and owner is None:
        raise UsageError(f"{out_dir} holds no job (no manifest.json or store.sqlite); give a job's output.dir "
                         "or its config file")
    since = float(manifest.get("updated") or 0) if manifest else 0.0  # when the last run started sending
    stored = _read_store(jobdir, since)
    totals = stored.totals
    names = list(manifest.get("batches", [])) if manifest else []
    succeeded, failed = _rows(jobdir, names, stored.index)
    rows_total = int(manifest.get("rows_total", 0)) if manifest else 0
    summary, summary_at = _summary(jobdir)
    state = _state(owner, summary, summary_at, totals["last_write"])
    live = None
    if state in ("running", "not running") and since:
        live = _live(jobdir, names, stored.index, stored.since_start, since, totals["last_write"],
                     running=owner is not None)
        succeeded, failed = succeeded + live["unwritten_ok"], failed + live["unwritten_failed"]
    pending = max(0, rows_total - succeeded - failed)
    if live is not None:
        live["eta_s"] = round(pending / live["rows_per_s"], 1) if live["rows_per_s"] and owner is not None else None
    updated = [totals["last_write"], manifest.get("updated") if manifest else None, summary_at]
    return {
        "out_dir": str(jobdir.path),
        "name": manifest.get("name") if manifest else None,
        "state": state,
        "rows_total": rows_total,
        "rows_done": succeeded,
        "rows_failed": failed,
        "rows_pending": pending,
        "this_run": live,
        "responses_stored": totals["by_state"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "cost_usd": round(totals["cost_usd"], 6),
        "last_update": max(filter(None, updated), default=None),
        "running": owner is not None,
        "pid": owner.get("pid") if owner else None,
        "host": owner.get("host") if owner else None,
        "finished": state == "finished",
        "resume_command": manifest.get("command") if manifest else None,
        "batches": stored.batches,
        "last_runs": history.read(jobdir.path, last=LAST_RUNS),
    }


@dataclass
class _Stored:
    """What the job's store holds, read once: its totals, the part index, the batch files (run.mode: batch)
    and the answers stored since the last run started, by state."""

    totals: dict[str, Any]
    index: dict[int, PartCounts] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    since_start: dict[str, int] = field(default_factory=dict)


def _read_store(jobdir: JobDir, since: float) -> _Stored:
    if not Path(jobdir.store_path).exists():
        return _Stored({"by_state": {}, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                        "last_write": None})
    # Read-only, through SQLite's WAL: a running writer is never blocked and never sees us.
    store = Store(jobdir.store_path, readonly=True)
    try:
        return _Stored(store.totals(), store.parts(), batch_rows(store),
                       store.answered_since(since) if since else {})
    finally:
        store.close()


def _state(owner: dict[str, Any] | None, summary: dict[str, Any] | None, summary_at: float | None,
           last_write: float | None) -> str:
    """running, finished, how the last run stopped (its summary's `stopped`), or not running."""
    if owner is not None:
        return "running"
    if summary is not None and summary_at is not None and summary_at >= (last_write or 0):
        # The summary is newer than every stored answer: it describes how the last run ended.
        return "finished" if summary.get("exit_code") in (EXIT_OK, EXIT_FAILED_ROWS) else str(summary.get("stopped"))
    return "not running"  # answers newer than any summary: the last run was killed or crashed


def _live(jobdir: JobDir, names: list[str], index: dict[int, PartCounts], stored: dict[str, int], since: float,
          last_write: float | None, *, running: bool) -> dict[str, Any]:
    """A run going on, or killed: the answers it stored so far (the store commits each one as it comes;
    the part files only per finished batch), how fast, and which of them no part file holds yet."""
    ok_now = stored.get("ok", 0)
    failed_now = sum(n for st, n in stored.items() if st != "ok")
    ok_parts = failed_parts = 0  # rows of batches this run finished, already counted from their parts
    complete = done_parts(jobdir.parts)
    for name in names:
        path = jobdir.parts / f"{name}.r.parquet"
        if name in complete and path.exists() and path.stat().st_mtime >= since:
            counts = index.get(part_number(name)) or count_part(jobdir.parts, name)
            ok_parts, failed_parts = ok_parts + counts.ok, failed_parts + counts.request_failed
    end = time.time() if running else (last_write or since)
    answers = ok_now + failed_now
    return {"since": since, "answers": answers, "ok": ok_now, "failed": failed_now,
            "rows_per_s": round(answers / (end - since), 3) if answers and end > since else 0.0,
            "unwritten_ok": max(0, ok_now - ok_parts), "unwritten_failed": max(0, failed_now - failed_parts)}


def batch_rows(store: Store) -> list[dict[str, Any]]:
    """run.mode: batch — each batch file of the job, as the last run saw it at the provider."""
    from ..batch.ledger import read_chunks

    return [{"chunk": c.chunk, "state": c.state, "batch_id": c.batch_id, "status": c.status, "lines": c.lines,
             "completed": int(c.counts.get("completed") or 0), "failed": int(c.counts.get("failed") or 0),
             "model": c.model}  # a cascade's stages and the audit have files of their own model
            for c in read_chunks(store) if c.state not in ("dropped", "split")]


def _live_line(live: dict[str, Any], pending: int, *, running: bool) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(live["since"]))
    line = (f"this run   {live['answers']:,} answers stored since {since} ({live['ok']:,} ok, {live['failed']:,} "
            f"failed), {live['rows_per_s']:,.1f} rows/s")
    if running and live["eta_s"] is not None:
        return line + f"; {pending:,} rows left, ETA {_duration(live['eta_s'])}"
    return line + ("" if running else f"; stopped with {pending:,} rows left (re-run the same command to resume)")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def print_status(target: str, *, as_json: bool = False) -> int:
    st = job_status(target)
    if as_json:
        sys.stdout.write(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["last_update"])) if st["last_update"] else "never"
    state = f"running (pid {st['pid']} on {st['host']})" if st["running"] else st["state"]
    stored = ", ".join(f"{k} {v:,}" for k, v in sorted(st["responses_stored"].items())) or "none"
    named = f"{st['name']} ({st['out_dir']})" if st.get("name") else st["out_dir"]
    print(f"job        {named}: {state}")
    print(f"rows       {st['rows_done']:,} done, {st['rows_failed']:,} failed, {st['rows_pending']:,} pending "
          f"of {st['rows_total']:,}")
    print(f"responses  {stored}")
    if st["this_run"] is not None:
        print(_live_line(st["this_run"], st["rows_pending"], running=st["running"]))
    print(f"tokens     {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} completion")
    print(f"cost       ${st['cost_usd']:.4f}")
    if st.get("engine") == "ray":
        print(f"shards     {st['shards_done']:,} of {st['shards_total']:,} done; "
              f"{st['workers_alive']} worker(s) alive")
    print(f"updated    {when}")
    if st["batches"]:
        live = sum(1 for b in st["batches"] if b["state"] != "collected")
        print(f"batches    {len(st['batches'])} ({live} not collected yet)")
        for b in st["batches"]:
            # The provider names its batches and their status: shown on the terminal, never obeyed.
            batch_id, status = printable(str(b["batch_id"] or "-")), printable(str(b["status"] or b["state"]))
            model = f" {printable(str(b['model']))}" if b.get("model") else ""
            print(f"  chunk {b['chunk']:>4}  {batch_id:<28} {status:<12} "
                  f"{b['completed']:,}/{b['lines']:,} done, {b['failed']:,} failed ({b['state']}){model}")
    if not st["running"] and st["rows_pending"] and st["resume_command"]:
        print(f"resume     {st['resume_command']}")
    if st["last_runs"]:
        print("last runs  (started UTC, exit, rows new/edited/retried/reused/input-failed/removed, requests, cost, "
              "stop)")
        for r in reversed(st["last_runs"]):
            print(f"  {r.get('started_at', '?')[:19]}  exit {r.get('exit_code')}  "
                  f"{r.get('rows_new', 0):,}/{r.get('rows_edited', 0):,}/{r.get('rows_retried', 0):,}/"
                  f"{r.get('rows_reused', 0):,}/{r.get('rows_input_failed', 0):,}/{r.get('rows_removed', 0):,}  "
                  f"{r.get('requests', 0):,} req  ${r.get('cost_usd', 0):.4f}  {r.get('stop_reason') or 'ok'}"
                  + (f": {printable(str(r['message'])[:100])}" if r.get("message") and r.get("stop_reason") else ""))
    return 0
