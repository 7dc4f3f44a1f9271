"""Soak: what mixed faults cost in throughput, against the same run without faults.

The scenario of tests/e2e/test_chaos.py's soak test (which asserts only what happened: every row exactly
once, limits held at the server): 3,000 rows at 24,000 requests/min (rate-bound, so the limiter paces
both runs), concurrency 32, 20 +- 10 ms latency with a 1% tail at 20x, and with faults ~7% of requests
answered with 429 / 5xx / resets / malformed or schema-invalid bodies. The simulator runs in its own
process (`python -m pipeline simulate`), the pipeline in this one; clean and faulty runs alternate in
rounds and the table shows medians. The ratio is the number to watch: faults cost retries, 429 pauses
and backoff sleeps, not a collapse.

    python benchmarks/soak.py                  # 3,000 rows, 3 rounds
    python benchmarks/soak.py -n 6000 --rounds 5
"""
from __future__ import annotations

import argparse
import time

from _common import (
    API_KEY_ENV,
    cleanup,
    job_config,
    median,
    print_machine,
    scratch,
    simulator,
    table,
    write_rows,
)

RPM = 24_000
CONCURRENCY = 32
LATENCY = ["--latency-ms", "20", "--latency-jitter-ms", "10", "--latency-tail-prob", "0.01",
           "--latency-tail-multiplier", "20"]
FAULTS = ["--rate-429", "0.02", "--rate-500", "0.01", "--rate-502", "0.01", "--rate-503", "0.01",
          "--rate-reset", "0.005", "--rate-malformed", "0.005", "--rate-schema-invalid", "0.005"]


def one_run(rows: int, faults: bool) -> tuple[float, int]:
    """Rows per second of one whole run, and the requests it sent."""
    import pipeline

    flags = ["--seed", "11", "--rpm", str(RPM), "--limit-burst-s", "1", "--retry-after-s", "0.02",
             "--api-key-env", API_KEY_ENV, *LATENCY, *(FAULTS if faults else [])]
    work = scratch("soak")
    try:
        data = write_rows(work / "in.jsonl", rows)
        with simulator(*flags) as sim:
            cfg = job_config(data, work / "out", sim.base_url, concurrency=CONCURRENCY, rpm=RPM,
                             limits={"max_retries": 8, "backoff_base_s": 0.05, "backoff_max_s": 1.0})
            started = time.perf_counter()
            summary = pipeline.run(cfg)
            elapsed = time.perf_counter() - started
        assert summary.succeeded + summary.failed == rows, summary
        return rows / elapsed, summary.requests_sent
    finally:
        cleanup(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--rows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print_machine()
    clean: list[float] = []
    faulty: list[float] = []
    requests: list[int] = []
    for _ in range(args.rounds):
        clean.append(one_run(args.rows, faults=False)[0])
        rate, sent = one_run(args.rows, faults=True)
        faulty.append(rate)
        requests.append(sent)
    print(table(["run", "rows/s (median)", "rows/s per round", "requests"], [
        ["fault-free", median(clean), " ".join(f"{r:.0f}" for r in clean), args.rows],
        ["mixed faults", median(faulty), " ".join(f"{r:.0f}" for r in faulty), int(median(requests))],
    ]))
    print(f"faulty / fault-free: {median(faulty) / median(clean):.2f} (limit {RPM / 60:.0f} rows/s)")


if __name__ == "__main__":
    main()
