"""`pipeline status OUT_DIR`: progress of a job, read safely while another process runs it."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from .errors import UsageError
from .output import done_parts
from .state import JobDir
from .store import Store


def job_status(out_dir: str) -> dict[str, Any]:
    jobdir = JobDir(out_dir)
    manifest = jobdir.read_manifest()
    if manifest is None and not Path(jobdir.store_path).exists():
        raise UsageError(f"{out_dir} holds no job (no manifest.json or store.sqlite); give a job's output.dir")
    succeeded = failed = 0
    for i in done_parts(jobdir.parts):
        for suffix in ("r", "f"):
            f = jobdir.parts / f"{i:08d}.{suffix}.parquet"
            if f.exists():
                n = pq.ParquetFile(f).metadata.num_rows
                if suffix == "r":
                    succeeded += n
                else:
                    failed += n
    totals: dict[str, Any] = {"by_state": {}, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                              "last_write": None}
    if Path(jobdir.store_path).exists():
        store = Store(jobdir.store_path, readonly=True)
        try:
            totals = store.totals()
        finally:
            store.close()
    rows_total = int(manifest.get("rows_total", 0)) if manifest else 0
    owner = jobdir.owner()
    summary_path = jobdir.path / "summary.json"
    last = max(filter(None, [totals["last_write"], manifest.get("updated") if manifest else None]), default=None)
    return {
        "out_dir": str(jobdir.path),
        "rows_total": rows_total,
        "rows_done": succeeded,
        "rows_failed": failed,
        "rows_pending": max(0, rows_total - succeeded - failed),
        "responses_stored": totals["by_state"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "cost_usd": round(totals["cost_usd"], 6),
        "last_update": last,
        "running": owner is not None,
        "pid": owner.get("pid") if owner else None,
        "finished": summary_path.exists() and owner is None,
    }


def print_status(out_dir: str, *, as_json: bool = False) -> int:
    st = job_status(out_dir)
    if as_json:
        sys.stdout.write(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["last_update"])) if st["last_update"] else "never"
    state = f"running (pid {st['pid']})" if st["running"] else ("finished" if st["finished"] else "not running")
    stored = ", ".join(f"{k} {v:,}" for k, v in sorted(st["responses_stored"].items())) or "none"
    print(f"job        {st['out_dir']}: {state}")
    print(f"rows       {st['rows_done']:,} done, {st['rows_failed']:,} failed, {st['rows_pending']:,} pending "
          f"of {st['rows_total']:,}")
    print(f"responses  {stored}")
    print(f"tokens     {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} completion")
    print(f"cost       ${st['cost_usd']:.4f}")
    print(f"updated    {when}")
    return 0
