"""Preview of proposed speed fixes, applied as monkeypatches, measured like overhead.py.

Already landed in pipeline/ (so no longer here): limits.Gate hands a freed slot to one waiter (it used
to wake ~19 futures per request), Limits.slot is a class-based context manager with fast paths, the
run freezes the GC and raises its threshold (runner.run_async), and validity is checked with
jsonschema-rs (structured.StructuredPlan).

NOT part of the pipeline: each patch below is the smallest code that shows what a fix in pipeline/
would gain, so the lead can judge it before anyone edits pipeline/. Once a fix lands in pipeline/,
its patch here becomes a no-op or breaks: delete it then. Variants are cumulative, run in rounds that
alternate with the bare aiohttp loop (same endpoint process), and the table shows medians.

    python benchmarks/fix_preview.py                 # 20k requests, concurrency 128, 3 rounds
    python benchmarks/fix_preview.py -n 40000 --rounds 5

Patches (in order):
  window    core.MAX_OPEN_BATCHES 4 -> 2: half as many rows waiting as Tasks at once (4,000 -> 2,000 for
            128 slots), so fewer live objects for the GC to walk
  store     Store commits on a writer thread (sqlite3 releases the GIL while stepping), so the executemany
            could run on the second core; put() still returns only after the commit (measured: no gain)
  uvloop    uvloop's event loop (policy installed around pipeline.run)
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

from _common import cleanup, endpoint, median, print_machine, scratch, table, write_rows
from overhead import bare_loop, measure, pipeline_once

import pipeline.core.transformer as core_mod
import pipeline.state.store as store_mod

ORIGINAL: dict[str, Any] = {}


# -- store: commits on a writer thread ---------------------------------------------------------------
def _store_flush(self: Any) -> None:
    self._flush_scheduled = False
    batch, self._pending = self._pending, []
    if not batch:
        return
    loop = asyncio.get_running_loop()
    if not hasattr(self, "_wlock"):
        self._wlock = threading.Lock()

    def work() -> None:
        with self._wlock:  # one commit at a time, in order
            try:
                self._write([r for r, _ in batch])
                err = None
            except Exception as exc:  # noqa: BLE001
                err = exc
        loop.call_soon_threadsafe(done, err)

    def done(err: Exception | None) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err) if err else fut.set_result(None)

    _pool().submit(work)


_POOL: Any = None


def _pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    return _POOL


def _store_close(self: Any) -> None:
    if _POOL is not None:
        _POOL.submit(lambda: None).result()  # drain queued commits
    ORIGINAL["store_close"](self)


PATCHES = ["window", "store", "uvloop"]


def apply(name: str) -> None:
    if name == "window":
        core_mod.MAX_OPEN_BATCHES = 2
    elif name == "store":
        # The store's sqlite connection is used from the writer thread (check_same_thread=False already).
        ORIGINAL["store_close"] = store_mod.Store.close
        store_mod.Store._flush = _store_flush  # type: ignore[method-assign]
        store_mod.Store.close = _store_close  # type: ignore[method-assign]
    elif name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    ap = argparse.ArgumentParser(description="the proposed fixes as monkeypatches: req/s and CPU per request")
    ap.add_argument("-n", "--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(PATCHES), help="comma-separated subset of: " + ",".join(PATCHES))
    ap.add_argument("--single", action="store_true", help="each patch alone on the baseline (default: cumulative)")
    args = ap.parse_args()
    wanted = [p for p in PATCHES if p in args.only.split(",")]
    print_machine()
    n, conc = args.requests, args.concurrency
    tmp = scratch("fixes")
    data = write_rows(tmp / "in.jsonl", n)
    out = tmp / "out"
    variants = ["baseline"] + [f"+{p}" for p in wanted]
    res: dict[str, dict[str, list[float]]] = {v: {"rps": [], "cpu": [], "ratio": []} for v in ["bare", *variants]}
    with endpoint() as server:
        asyncio.run(bare_loop(server.base_url, 2000, conc))
        # Patches cannot be undone in-process: every variant runs in a fresh child process.
        for r in range(1, args.rounds + 1):
            b = measure(lambda: asyncio.run(bare_loop(server.base_url, n, conc)), server)
            bare_rps = n / b["wall"]
            res["bare"]["rps"].append(bare_rps)
            res["bare"]["cpu"].append(b["cpu"] * 1000 / n)
            for i, v in enumerate(variants):
                chosen = ([wanted[i - 1]] if i else []) if args.single else wanted[:i]
                cmd = [sys.executable, __file__, "--child", str(data), str(out), server.base_url, str(conc),
                       ",".join(chosen)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                wall, cpu = map(float, line.split())
                res[v]["rps"].append(n / wall)
                res[v]["cpu"].append(cpu * 1000 / n)
                res[v]["ratio"].append((n / wall) / bare_rps)
            print(f"round {r}: bare {bare_rps:,.0f} req/s; " + ", ".join(
                f"{v} {res[v]['rps'][-1]:,.0f}" for v in variants), flush=True)
    rows = [["bare aiohttp", median(res["bare"]["rps"]), median(res["bare"]["cpu"]), 1.0]]
    rows += [[v, median(res[v]["rps"]), median(res[v]["cpu"]), median(res[v]["ratio"])] for v in variants]
    how = "each patch alone" if args.single else "patches are cumulative"
    print(f"\n{n:,} requests, concurrency {conc}, medians of {args.rounds} rounds; {how}")
    print(table(["variant", "req/s", "client CPU ms/req", "vs bare req/s"], rows))
    cleanup(tmp)


def child(argv: list[str]) -> None:
    from pathlib import Path

    data, out, base_url, conc, patches = argv
    for p in filter(None, patches.split(",")):
        apply(p)
    # Warm-up run (imports, connections), then the measured one.
    warm = Path(out + "-warm")
    pipeline_once(write_rows(Path(out + "-warm.jsonl"), 500), warm, base_url, int(conc))
    c0, w0 = time.process_time(), time.perf_counter()
    pipeline_once(Path(data), Path(out), base_url, int(conc))
    print(f"{time.perf_counter() - w0} {time.process_time() - c0}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
