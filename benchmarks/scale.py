"""Scale: peak RSS of a whole run for 10k, 100k and 1M generated rows, and the ratio RSS(1M) / RSS(100k).

Each size runs in its own child process, which reports its peak RSS (VmHWM from /proc/self/status) and
its RSS after the imports alone. The transport is a fake by default: `pipeline.run_async(cfg,
transport=FakeTransport())` answers every request at once with the same tool-call body as the
endpoint of overhead.py, so everything but the socket runs (render, limits, classify, validate, SQLite
store, Parquet parts, merge). A 1M-row run over real HTTP would take ~5-8 minutes on this machine at
~2-3k requests/s; `--transport http` does that against the minimal endpoint in a separate process.
The sizes run concurrently by default (`--jobs 2`; two cores): peak RSS is per process and is not
affected, only the wall times are.

    python benchmarks/scale.py                           # 10k, 100k, 1M with the fake transport
    python benchmarks/scale.py --sizes 10000,100000 --transport http
    python benchmarks/scale.py --jobs 1                  # one at a time (clean wall times)

Targets (issue 7): peak RSS <= 300 MB at 1M rows, RSS(1M) / RSS(100k) <= 1.3.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    FakeTransport,
    cleanup,
    endpoint,
    job_config,
    print_machine,
    scratch,
    table,
    vm,
    write_rows,
)


def child(args: list[str]) -> None:
    data, out, transport, base_url, conc = args
    import asyncio

    import polars  # noqa: F401
    import pyarrow  # noqa: F401

    from pipeline.config import load_config
    from pipeline.engines.runner import run_async
    from pipeline.send.transport import HttpTransport  # noqa: F401 - imported like a real run would

    rss_imports = vm("VmRSS")
    cfg = load_config(job_config(Path(data), Path(out), base_url, concurrency=int(conc)))
    t0, c0 = time.perf_counter(), time.process_time()
    fake = FakeTransport() if transport == "fake" else None
    summary = asyncio.run(run_async(cfg, transport=fake, quiet=True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"rows": summary.rows_total, "ok": summary.succeeded, "failed": summary.failed,
                      "wall": wall, "cpu": cpu, "hwm": vm("VmHWM"), "rss_end": vm("VmRSS"),
                      "rss_imports": rss_imports}))


def main() -> None:
    ap = argparse.ArgumentParser(description="peak RSS at 10k / 100k / 1M rows")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--transport", choices=["fake", "http"], default="fake")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=2, help="sizes run at once (each in its own process)")
    args = ap.parse_args()
    print_machine()
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = scratch("scale")
    t0 = time.perf_counter()
    files = {n: write_rows(tmp / f"in-{n}.jsonl", n) for n in sizes}
    print(f"generated inputs in {time.perf_counter() - t0:.1f}s: " +
          ", ".join(f"{n:,} rows = {files[n].stat().st_size / 1e6:.0f} MB" for n in sizes), flush=True)
    server = endpoint() if args.transport == "http" else None
    base_url = server.base_url if server else "http://127.0.0.1:9/v1"  # never contacted by the fake
    results: dict[int, dict[str, Any]] = {}

    def run(n: int) -> None:
        cmd = [sys.executable, __file__, "--child", str(files[n]), str(tmp / f"out-{n}"), args.transport, base_url,
               str(args.concurrency)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{n:,} rows: child failed:\n{proc.stderr[-3000:]}")
        results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[n]
        print(f"  {n:>9,} rows: {r['wall']:.1f}s, peak RSS {r['hwm']:.0f} MB", flush=True)

    try:
        # Largest first, so the long one overlaps the short ones.
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(run, sorted(sizes, reverse=True)))
    finally:
        if server:
            server.stop()
        cleanup(tmp)
    rows = []
    for n in sizes:
        r = results[n]
        if r["ok"] != n:
            raise SystemExit(f"{n:,} rows: only {r['ok']:,} succeeded ({r['failed']:,} failed)")
        rows.append([f"{n:,}", r["rss_imports"], r["hwm"], r["hwm"] - r["rss_imports"], r["wall"], n / r["wall"],
                     r["cpu"] * 1000 / n])
    print(f"\ntransport: {args.transport}; concurrency {args.concurrency}; sizes run {args.jobs} at a time")
    print(table(["rows", "RSS after imports MB", "peak RSS MB", "peak - imports MB", "wall s", "rows/s",
                 "CPU ms/row"], rows))
    if 1_000_000 in results:
        big = results[1_000_000]["hwm"]
        print(f"peak RSS at 1M rows: {big:.0f} MB (target <= 300): {'met' if big <= 300 else 'NOT met'}")
        if 100_000 in results:
            ratio = big / results[100_000]["hwm"]
            print(f"RSS(1M) / RSS(100k) = {ratio:.2f} (target <= 1.3): {'met' if ratio <= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
