"""Report size and generation time for the demo job and a large one (default 100,000 rows).

    python benchmarks/report_scale.py [--rows 100000] [--dir /tmp/report-scale]

The large job is real: the demo's prompt and schema over generated reviews, answered by the in-process
simulator (no latency, a few 429s and 5xx so retries and pauses show), written by the runner to its
store and Parquet outputs. A second invocation reuses the finished job and only times the report.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import pipeline
from pipeline.reporting import write_report

REPO = Path(__file__).resolve().parent.parent
PRODUCTS = [("tent", "outdoors"), ("espresso machine", "kitchen"), ("USB-C hub", "electronics"),
            ("desk lamp", "home"), ("running shoes", "sports")]
PHRASES = ["works exactly as described", "arrived late", "the instructions were useless", "great value",
           "broke after a week", "support answered quickly", "feels cheap", "would buy again"]


def make_input(path: Path, rows: int) -> None:
    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            product, category = rng.choice(PRODUCTS)
            stars = rng.randint(1, 5)
            text = f"The {product} {rng.choice(PHRASES)}; {rng.choice(PHRASES)}. #{i}"
            gold = "positive" if stars >= 4 else "negative" if stars <= 2 else "mixed"
            fh.write(json.dumps({"review_id": f"B{i:07d}", "product": product, "category": category,
                                 "stars": stars, "text": text, "gold_sentiment": gold}) + "\n")


def timed_report(out_dirs: list[Path], dest: Path, gold: str | None = None) -> tuple[float, float, int]:
    cpu = time.process_time()
    _, seconds = write_report(out_dirs, dest, gold=gold)
    return seconds, time.process_time() - cpu, os.path.getsize(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/report-scale")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    demo = base / "demo"
    if not (demo / "summary.json").exists():
        pipeline.run(str(REPO / "configs" / "demo.yaml"), output__dir=str(demo), quiet=True)
    big_in, big = base / f"in-{args.rows}.jsonl", base / f"big-{args.rows}"
    if not big_in.exists():
        make_input(big_in, args.rows)
    if not (big / "summary.json").exists():
        started = time.perf_counter()
        s = pipeline.run(str(REPO / "configs" / "demo.yaml"), quiet=True, output__dir=str(big),
                         input={"path": str(big_in), "columns": ["product", "category", "stars", "gold_sentiment"]},
                         endpoint={"simulator": {"latency_ms": 0, "rate_429": 0.002, "rate_503": 0.002,
                                                 "rate_schema_invalid": 0.003, "retry_after_s": 0.05}},
                         limits={"requests_per_minute": None, "max_concurrency": 128, "backoff_base_s": 0.05})
        print(f"job: {s.succeeded:,} succeeded, {s.failed:,} failed in {time.perf_counter() - started:.1f}s")
    for name, dirs, gold in (("demo", [demo], None), ("big", [big], None), ("big-gold", [big], "gold_sentiment")):
        seconds, cpu, size = timed_report(dirs, base / f"{name}.html", gold)
        print(f"{name} ({', '.join(d.name for d in dirs)}{', --gold ' + gold if gold else ''}): "
              f"{size / 1024:,.0f} KB in {seconds:.2f}s wall, {cpu:.2f}s CPU")


if __name__ == "__main__":
    main()
