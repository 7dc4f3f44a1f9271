"""Latency hiding: with 200 ms per answer and concurrency 256, does the pipeline keep 256 requests in flight?

The ideal is concurrency / latency = 1,280 requests/s. The endpoint runs in a separate process: the
built-in simulator (`python -m pipeline simulate --latency-ms 200`, the default) or the minimal
endpoint of overhead.py (`--server fast`). The bare aiohttp loop runs against the same endpoint for
reference. requests/s is rows / wall time of the whole run (`run_async` as `pipeline.run` calls it,
scan, merge and summary included); a Probe around the pipeline's own HttpTransport also gives the rate
from the first request to the last answer, and the mean number of requests in flight.

    python benchmarks/latency.py                  # simulator, 12,800 requests (50 waves of 256), 2 rounds
    python benchmarks/latency.py --server both    # also the minimal endpoint of overhead.py
    python benchmarks/latency.py -n 25600 --rounds 3 --latency-ms 200 --concurrency 256

Target (issue 7): achieved >= 0.9 x concurrency / latency.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from _common import (
    Child,
    Probe,
    cleanup,
    endpoint,
    http_transport,
    job_config,
    median,
    print_machine,
    run_probed,
    scratch,
    simulator,
    table,
    write_rows,
)
from overhead import bare_loop

import pipeline


def run_pipeline(data, out, base_url: str, concurrency: int) -> tuple[float, float, Probe, float]:  # type: ignore[no-untyped-def]
    """The pipeline (run_async, as pipeline.run calls it) with its own HttpTransport behind a Probe."""
    cleanup(out)
    probe = Probe(http_transport(base_url, concurrency))
    c0, w0, m0 = time.process_time(), time.perf_counter(), time.monotonic()  # the loop's clock is monotonic
    summary = run_probed(job_config(data, out, base_url, concurrency=concurrency), probe)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if summary.succeeded != summary.rows_total:
        raise SystemExit(f"pipeline run did not succeed on every row: {summary}")
    return wall, cpu, probe, m0


def main() -> None:
    ap = argparse.ArgumentParser(description="achieved requests/s vs concurrency/latency")
    ap.add_argument("-n", "--requests", type=int, default=12_800)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--server", choices=["sim", "fast", "both"], default="sim")
    ap.add_argument("--rounds", type=int, default=2, help="bare + pipeline runs per endpoint; medians reported")
    args = ap.parse_args()
    print_machine()
    n, conc, lat = args.requests, args.concurrency, args.latency_ms
    ideal = conc / (lat / 1000.0)
    tmp = scratch("latency")
    data = write_rows(tmp / "in.jsonl", n)
    rows: list[list[object]] = []
    verdicts: list[tuple[str, float]] = []
    steady: list[list[object]] = []
    servers = ["sim", "fast"] if args.server == "both" else [args.server]
    for kind in servers:
        server: Child = simulator("--latency-ms", str(lat)) if kind == "sim" else endpoint(latency_ms=lat)
        name = f"simulator --latency-ms {lat:g}" if kind == "sim" else f"fast endpoint {lat:g} ms"
        with server:
            # warm-up (imports, connections)
            cleanup(tmp / "warm")
            pipeline.run(job_config(write_rows(tmp / "warm.jsonl", 300), tmp / "warm", server.base_url,
                                    concurrency=conc))
            fracs = []
            for r in range(1, args.rounds + 1):
                s0 = server.cpu_s()
                w0 = time.perf_counter()
                c0 = time.process_time()
                ok = asyncio.run(bare_loop(server.base_url, n, conc))
                bw, bc = time.perf_counter() - w0, time.process_time() - c0
                bs = server.cpu_s() - s0
                if ok != n:
                    raise SystemExit(f"bare loop: only {ok} of {n} succeeded")
                s0 = server.cpu_s()
                pw, pc, probe, m0 = run_pipeline(data, tmp / "out", server.base_url, conc)
                ps = server.cpu_s() - s0
                first, last = probe.span()
                for client, wall, cpu, scpu in (("bare aiohttp", bw, bc, bs), ("pipeline", pw, pc, ps)):
                    rps = n / wall
                    rows.append([name, r, client, rps, rps / ideal, cpu * 1000 / n, scpu / wall, wall])
                steady.append([name, r, n / (last - first), n / (last - first) / ideal, probe.mean_in_flight(),
                               probe.max_in_flight, first - m0, m0 + pw - last])
                fracs.append((n / pw) / ideal)
        verdicts.append((name, median(fracs)))
    print()
    print(f"{n:,} requests, concurrency {conc}, latency {lat:g} ms: ideal {ideal:,.0f} requests/s")
    print(table(["endpoint (own process)", "round", "client", "req/s", "of ideal", "client CPU ms/req",
                 "server CPU share", "wall s"], rows))
    print()
    print("pipeline, from its first request sent to its last answer (start-up and merge excluded):")
    print(table(["endpoint", "round", "req/s", "of ideal", "mean in flight", "max in flight", "start-up s", "finish s"],
                steady))
    for name, frac in verdicts:
        print(f"pipeline vs {name}: {frac:.3f} of concurrency/latency, median of {args.rounds} (target >= 0.90): "
              f"{'met' if frac >= 0.9 else 'NOT met'}")
    cleanup(tmp)


if __name__ == "__main__":
    main()
