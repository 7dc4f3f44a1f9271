"""Overhead: the full pipeline vs a bare aiohttp + semaphore loop, against the same instant endpoint.

The endpoint (benchmarks/_endpoint.py) runs in its own process and answers every POST at once with
a fixed tool-call chat.completion, so the pipeline's whole path runs: read JSONL, render Jinja, shape
for tool mode, hash the request key, limit, send, classify, usage, extract + JSON-Schema validation,
SQLite store, Parquet parts, merge, summary. Bare and pipeline alternate in rounds within one run
(this machine is shared and noisy); the ratio is taken per round, then the median.

    python benchmarks/overhead.py                      # 20k requests, concurrency 128, 3 rounds
    python benchmarks/overhead.py -n 50000 --rounds 5 --concurrency 256
    python benchmarks/overhead.py --uvloop             # also the pipeline with uvloop installed
    python benchmarks/overhead.py --profile /tmp/p.prof  # one extra cProfile'd pipeline run, top entries

Two more clients split the pipeline's cost: "HttpTransport only" is the bare loop through the
pipeline's own transport (its session, timeouts, headers), and "pipeline, no socket" is the whole
pipeline with a transport that answers at once (run_async(cfg, transport=FakeTransport())).

Client CPU is time.process_time() around the run (all threads of this process: the store's fsync
thread and Arrow's writers count). Server CPU is read from /proc/PID/stat of the endpoint process.
Targets (issue 7): pipeline >= 0.6 x bare requests/s, <= 0.35 ms CPU per request.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import time
from pathlib import Path

import aiohttp
import orjson
from _common import (
    FakeTransport,
    cleanup,
    endpoint,
    http_transport,
    job_config,
    median,
    print_machine,
    scratch,
    table,
    write_rows,
)

import pipeline

# Same size and shape as the pipeline's tool-mode request for one generated row.
PAYLOAD = (
    b'{"max_tokens":200,"messages":[{"content":"You label reviews.","role":"system"},{"content":"Review: review '
    b'number 0000000: works fine, arrived late","role":"user"}],"model":"openai/gpt-4-turbo","temperature":0.0,'
    b'"tool_choice":{"function":{"name":"output"},"type":"function"},"tools":[{"function":{"description":"Record '
    b'the answer. Call this function exactly once; its arguments are the answer.","name":"output","parameters":'
    b'{"properties":{"score":{"maximum":5,"minimum":1,"type":"integer"},"sentiment":{"enum":["positive",'
    b'"negative","mixed"],"type":"string"},"tags":{"items":{"type":"string"},"type":"array"}},"required":'
    b'["sentiment","score"],"type":"object"}},"type":"function"}]}'
)


async def bare_loop(base_url: str, n: int, concurrency: int) -> int:
    """The baseline: one session, a semaphore, read + decode every answer. Returns successes."""
    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench-local", "Content-Type": "application/json"}
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one() -> None:
            nonlocal ok
            try:
                async with session.post(url, data=PAYLOAD) as resp:
                    body = await resp.read()
                    if resp.status == 200 and orjson.loads(body)["choices"]:
                        ok += 1
            finally:
                sem.release()

        tasks = set()
        for _ in range(n):
            await sem.acquire()
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
    return ok


def measure(fn, server) -> dict[str, float]:  # type: ignore[no-untyped-def]
    gc.collect()
    s0, c0, w0 = server.cpu_s(), time.process_time(), time.perf_counter()
    done = fn()
    w1, c1, s1 = time.perf_counter(), time.process_time(), server.cpu_s()
    return {"wall": w1 - w0, "cpu": c1 - c0, "server_cpu": s1 - s0, "done": done}


def pipeline_once(data: Path, out: Path, base_url: str, concurrency: int) -> int:
    cleanup(out)
    summary = pipeline.run(job_config(data, out, base_url, concurrency=concurrency))
    if summary.failed or summary.succeeded != summary.rows_total:
        raise SystemExit(f"pipeline run did not succeed on every row: {summary}")
    return summary.succeeded


async def transport_loop(base_url: str, n: int, concurrency: int) -> int:
    """The bare loop, but through the pipeline's own HttpTransport.send (its session, timeouts, headers)."""
    transport = http_transport(base_url, concurrency)
    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async def one() -> None:
        nonlocal ok
        try:
            reply = await transport.send(PAYLOAD)
            if reply.status == 200 and orjson.loads(reply.body)["choices"]:
                ok += 1
        finally:
            sem.release()

    tasks = set()
    for _ in range(n):
        await sem.acquire()
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    await transport.close()
    return ok


def pipeline_fake(data: Path, out: Path, concurrency: int) -> int:
    """The whole pipeline with no socket: run_async with a transport that answers at once."""
    from pipeline.config import load_config
    from pipeline.engines.runner import run_async

    cleanup(out)
    fake = FakeTransport()
    cfg = load_config(job_config(data, out, "http://127.0.0.1:9/v1", concurrency=concurrency))
    summary = asyncio.run(run_async(cfg, transport=fake, quiet=True))
    return summary.succeeded


def main() -> None:
    ap = argparse.ArgumentParser(description="pipeline vs bare aiohttp requests/s and CPU per request")
    ap.add_argument("-n", "--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the HttpTransport-only and no-socket runs (bare and pipeline only)")
    ap.add_argument("--uvloop", action="store_true", help="also run the pipeline with uvloop's event loop policy")
    ap.add_argument("--server-uvloop", action="store_true", help="run the endpoint on uvloop")
    ap.add_argument("--profile", metavar="FILE", help="after the rounds, one cProfile'd pipeline run saved to FILE")
    ap.add_argument("--top", type=int, default=25, help="profile entries to print")
    args = ap.parse_args()
    print_machine()
    n, conc = args.requests, args.concurrency
    tmp = scratch("overhead")
    data = write_rows(tmp / "in.jsonl", n)
    out = tmp / "out"
    rows: list[list[object]] = []
    per: dict[str, dict[str, list[float]]] = {}
    ratios: list[float] = []
    with endpoint(uvloop=args.server_uvloop) as server:
        url = server.base_url
        # Warm-up: imports, first connections, page cache.
        asyncio.run(bare_loop(url, 2000, conc))
        pipeline.run(job_config(write_rows(tmp / "warm.jsonl", 500), tmp / "warm", url, concurrency=conc))
        variants = [("bare aiohttp", lambda: asyncio.run(bare_loop(url, n, conc)))]
        if not args.no_breakdown:
            variants.append(("HttpTransport only", lambda: asyncio.run(transport_loop(url, n, conc))))
        variants.append(("pipeline", lambda: pipeline_once(data, out, url, conc)))
        if not args.no_breakdown:
            variants.append(("pipeline, no socket", lambda: pipeline_fake(data, out, conc)))
        if args.uvloop:
            def with_uvloop() -> int:
                import uvloop

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
                try:
                    return pipeline_once(data, out, url, conc)
                finally:
                    asyncio.set_event_loop_policy(None)

            variants.append(("pipeline + uvloop", with_uvloop))
        for r in range(1, args.rounds + 1):
            got = {}
            for name, fn in variants:
                m = measure(fn, server)
                if m["done"] != n:
                    raise SystemExit(f"{name}: only {m['done']} of {n} requests succeeded")
                got[name] = m
                d = per.setdefault(name, {"rps": [], "cpu": [], "ratio": [], "share": []})
                d["rps"].append(n / m["wall"])
                d["cpu"].append(m["cpu"] * 1000 / n)
                d["share"].append(m["server_cpu"] / m["wall"])
                rows.append([f"{r}", name, n / m["wall"], m["cpu"] * 1000 / n, m["server_cpu"] / m["wall"],
                             m["server_cpu"] * 1000 / n, m["wall"]])
            bare_rps = n / got["bare aiohttp"]["wall"]
            for name in got:
                per[name]["ratio"].append((n / got[name]["wall"]) / bare_rps)
            ratios.append(per["pipeline"]["ratio"][-1])
            print(f"round {r}: " + ", ".join(f"{k} {n / m['wall']:,.0f} req/s" for k, m in got.items()), flush=True)

        print()
        print(f"{n:,} requests per run, concurrency {conc}, endpoint in a separate process "
              f"(server CPU share is of one core)")
        print(table(["round", "client", "req/s", "client CPU ms/req", "server CPU share", "server CPU ms/req",
                     "wall s"], rows))
        print("\nmedians over the rounds (ratio taken per round against that round's bare loop):")
        print(table(["client", "req/s", "client CPU ms/req", "req/s vs bare", "server CPU share"],
                    [[k, median(v["rps"]), median(v["cpu"]), median(v["ratio"]), median(v["share"])]
                     for k, v in per.items()]))
        pipe_cpu = median(per["pipeline"]["cpu"])
        print()
        ratio = median(ratios)
        print(table(["target", "value", "goal", ""], [
            ["pipeline / bare req/s", f"{ratio:.2f}", ">= 0.60", "met" if ratio >= 0.6 else "NOT met"],
            ["pipeline CPU ms/req", f"{pipe_cpu:.3f}", "<= 0.35", "met" if pipe_cpu <= 0.35 else "NOT met"],
        ]))
        print(f"peak RSS of this client process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            cleanup(out)
            cfg = job_config(data, out, server.base_url, concurrency=conc)
            t0 = time.perf_counter()
            prof.runcall(pipeline.run, cfg)
            wall = time.perf_counter() - t0
            prof.dump_stats(args.profile)
            print(f"\ncProfile'd pipeline run: {n:,} requests in {wall:.1f}s (profiler overhead included); "
                  f"saved to {args.profile}")
            for key in ("cumulative", "tottime"):
                print(f"\n--- top {args.top} by {key} ---")
                pstats.Stats(prof).sort_stats(key).print_stats(args.top)
    cleanup(tmp)


if __name__ == "__main__":
    main()
