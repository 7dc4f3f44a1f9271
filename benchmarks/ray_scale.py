"""The Ray engine on one machine: throughput at 200 ms latency, shared limits, per-row overhead vs local.

Starts one local Ray instance (`ray.init(num_cpus=2)`) and simulator processes on 127.0.0.1
(`python -m pipeline simulate`), then runs `pipeline.run` with `run.engine: ray`:

1. latency: 4 workers, total concurrency 256, simulator at 200 ms. requests/s is read from the
   simulator's request counter (sampled every 0.25 s) between 10% and 90% of the requests, and as
   rows / wall for the whole run (Ray Data start-up, scan and summary included); target >= 0.85 of
   concurrency / latency.
2. limits: 4 workers; the simulator enforces requests/min and tokens/min (1 s buckets, the strictest);
   the pipeline is configured with the same limits. Share of the requests/min limit used in the first
   60 s of sending (target >= 95%), and 429s received (target 0).
3. overhead: the same 4,000 rows against an instant simulator, local engine vs Ray engine (4 workers):
   wall ms per row (Ray start-up excluded: the instance is already running).

    python benchmarks/ray_scale.py                       # all three, about 2.5 minutes
    python benchmarks/ray_scale.py --only latency -n 12800
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import (
    cleanup,
    job_config,
    print_machine,
    scratch,
    simulator,
    table,
    write_rows,
)

import pipeline


def sim_stats(base_url: str) -> dict[str, Any]:
    root = base_url.split("/api/v1")[0].split("/v1")[0]
    with urllib.request.urlopen(root + "/_sim/stats", timeout=10) as resp:
        return json.loads(resp.read())


class Sampler:
    """(time, requests received) from the simulator every 0.25 s, in a thread."""

    def __init__(self, base_url: str) -> None:
        self.base_url, self.points = base_url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.points.append((time.monotonic(), sim_stats(self.base_url)["requests"]))
            self._stop.wait(0.25)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rate_between(self, lo: float, hi: float) -> float:
        """Requests/s between the samples where the count crossed lo and hi (shares of the final count)."""
        total = self.points[-1][1]
        a = next(p for p in self.points if p[1] >= lo * total)
        b = next(p for p in self.points if p[1] >= hi * total)
        return (b[1] - a[1]) / max(b[0] - a[0], 1e-9)

    def first_window(self, window: float) -> int:
        start = next(p for p in self.points if p[1] > 0)
        inside = [p for p in self.points if p[0] <= start[0] + window]
        return inside[-1][1]


def ray_cfg(data: Path, out: Path, url: str, *, workers: int, concurrency: int, **kw: Any) -> dict[str, Any]:
    return job_config(data, out, url, concurrency=concurrency, run={"engine": "ray", "workers": workers,
                                                                    "progress": False}, **kw)


def latency(tmp: Path, n: int, workers: int, concurrency: int, lat_ms: float) -> list[list[Any]]:
    data = write_rows(tmp / "lat.jsonl", n)
    ideal = concurrency / (lat_ms / 1000)
    with simulator("--latency-ms", str(lat_ms)) as sim:
        with Sampler(sim.base_url) as s:
            t0 = time.perf_counter()
            summary = pipeline.run(ray_cfg(data, tmp / "lat-out", sim.base_url, workers=workers,
                                           concurrency=concurrency, input={"batch_size": 500}))
            wall = time.perf_counter() - t0
    assert summary.succeeded == n, summary
    steady = s.rate_between(0.1, 0.9)
    return [["latency: steady req/s (10-90%)", round(steady), round(ideal), round(steady / ideal, 3)],
            ["latency: rows / wall (whole run)", round(n / wall), round(ideal), round(n / wall / ideal, 3)]]


def limits(tmp: Path, workers: int, rpm: int, tpm: int, window: float) -> list[list[Any]]:
    n = int(rpm * (window + 8) / 60)
    data = write_rows(tmp / "lim.jsonl", n)
    flags = ["--rpm", str(rpm), "--tpm", str(tpm), "--limit-burst-s", "1"]
    with simulator(*flags) as sim:
        with Sampler(sim.base_url) as s:
            summary = pipeline.run(ray_cfg(data, tmp / "lim-out", sim.base_url, workers=workers, concurrency=64,
                                           rpm=rpm, tpm=tpm, input={"batch_size": 100}))
        stats = sim_stats(sim.base_url)
    assert summary.succeeded == n, summary
    used = s.first_window(window) / (rpm * window / 60)
    return [[f"limits: share of {rpm}/min used in first {window:g} s", round(used, 3), 0.95, ""],
            ["limits: 429s received", stats["by_status"].get("429", 0), 0, ""],
            ["limits: server peak rpm / limit", round(stats["peak_rpm"] / rpm, 3), "<= 1", ""]]


def overhead(tmp: Path, n: int, workers: int) -> list[list[Any]]:
    data = write_rows(tmp / "ovh.jsonl", n)
    rows = []
    with simulator("--latency-ms", "0") as sim:
        for engine in ("local", "ray"):
            cfg = job_config(data, tmp / f"ovh-{engine}", sim.base_url, concurrency=128,
                             run={"engine": engine, "workers": workers, "progress": False})
            t0 = time.perf_counter()
            summary = pipeline.run(cfg)
            wall = time.perf_counter() - t0
            assert summary.succeeded == n, summary
            rows.append([f"overhead: {engine} engine ms/row", round(wall / n * 1000, 3), round(wall, 2), ""])
    rows.append(["overhead: ray - local ms/row", round(rows[1][1] - rows[0][1], 3), "", ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="the Ray engine on one machine")
    ap.add_argument("-n", "--requests", type=int, default=12_800)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--rpm", type=int, default=1200)
    ap.add_argument("--tpm", type=int, default=1_000_000)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--overhead-rows", type=int, default=4000)
    ap.add_argument("--only", choices=["latency", "limits", "overhead"])
    args = ap.parse_args()
    import ray
    print_machine()
    with open("/proc/loadavg") as fh:
        print("load average before:", fh.read().split()[:3])
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")
    tmp = scratch("ray")
    out: list[list[Any]] = []
    try:
        if args.only in (None, "latency"):
            out += latency(tmp, args.requests, args.workers, args.concurrency, args.latency_ms)
        if args.only in (None, "limits"):
            out += limits(tmp, args.workers, args.rpm, args.tpm, args.window)
        if args.only in (None, "overhead"):
            out += overhead(tmp, args.overhead_rows, args.workers)
    finally:
        ray.shutdown()
        cleanup(tmp)
    print(table(["measure", "value", "reference", "ratio"], out))


if __name__ == "__main__":
    main()
