"""What the price levers save on a typical labelling job (issue 21), on the built-in simulator.

The workload: N rows (default 5,000), each request ~1,500 tokens of instructions and few-shot examples
shared by every row, then ~300 tokens of the row, and a one-word answer (an enum); openai/gpt-4o-mini,
which the simulator charges at its own list price ($0.15 in, $0.075 cached, $0.60 out per million; the
Batch API half of each). The simulator runs in its own process (`python -m pipeline simulate`) and
caches prompt prefixes as OpenAI does (1,024+ tokens, steps of 128), so the figures are what the
endpoint reported and billed, in `results.parquet`.

Paths, each a fresh job over the same rows:
    sync, one by one, no caching      the baseline: prompt.cache off and a simulator that caches nothing
    sync + caching                    prompt.cache: auto (the default)
    batch + caching                   run.mode: batch
    sync + caching + 10 rows/request  prompt.rows_per_request: 10 (row packing)
    batch + caching + 10 rows/request run.mode: batch, each Batch API line one pack of ten rows

Per path: cost per million labels, the ratio to the baseline, the share of prompt tokens read from the
cache, the share of labels identical to the baseline's, and client CPU per row (this process: the
pipeline; the simulator's own CPU is not counted).

    python benchmarks/savings.py [--rows 5000] [--concurrency 64]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import polars as pl
from _common import API_KEY_ENV, cleanup, print_machine, scratch, simulator, table

MODEL = "openai/gpt-4o-mini"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative", "mixed"]}},
          "required": ["label"], "additionalProperties": False}
WORDS = ("battery screen delivery price quality support broke works fine late early cheap sturdy flimsy loud "
         "quiet bright dim fast slow refund replaced perfect awful decent average lovely").split()


def instructions() -> str:
    """~1,500 tokens shared by every row: the task, the labels, then few-shot examples."""
    rng = random.Random(21)
    lines = ["You label customer reviews of household products by overall sentiment.",
             "Answer positive, negative or mixed. Mixed means both praise and complaints of similar weight.",
             "Ignore shipping complaints unless the product itself is affected. Examples follow.", ""]
    for i in range(40):
        review = " ".join(rng.choice(WORDS) for _ in range(18))
        lines.append(f"Example {i + 1}: {review} -> {rng.choice(['positive', 'negative', 'mixed'])}")
    return "\n".join(lines) + "\n\nReview to label: "


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(190))  # ~300 tokens
            fh.write(json.dumps({"rid": f"r{i:06d}", "text": f"({i}) {text}"}) + "\n")


def config(data: Path, out: Path, base_url: str, concurrency: int, *, cache: str, mode: str,
           rows_per_request: int) -> dict[str, Any]:
    prompt: dict[str, Any] = {"user": instructions() + "{{ text }}", "cache": cache}
    if rows_per_request > 1:
        prompt["rows_per_request"] = rows_per_request
    return {
        "input": {"path": str(data), "id_column": "rid"},
        "endpoint": {"base_url": base_url, "model": MODEL, "api_key_env": API_KEY_ENV},
        "prompt": prompt, "params": {"temperature": 0, "max_tokens": 20 * rows_per_request},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "max_concurrency": concurrency},
        "run": {"progress": False, "mode": mode},
        "batch": {"poll_interval_s": 0.05, "poll_max_interval_s": 0.2},
        "output": {"dir": str(out)},
    }


def run_path(name: str, sim_cfg: dict[str, Any], work: Path, data: Path, concurrency: int,
             **how: Any) -> dict[str, Any]:
    import pipeline

    cfg_file = work / f"sim-{name.replace(' ', '_').replace('/', '')}.json"
    cfg_file.write_text(json.dumps(sim_cfg))
    with simulator("--config", str(cfg_file)) as sim:
        out = work / f"out-{len(list(work.iterdir()))}"
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = pipeline.run(config(data, out, sim.base_url, concurrency, **how), quiet=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    if not (out / "results.parquet").exists():
        raise SystemExit(f"{name}: the run wrote no results (exit {summary.exit_code}: {summary.stop_message})")
    results = pl.read_parquet(out / "results.parquet")
    labels = results.select("rid", pl.col("output").struct.field("label"))
    return {"name": name, "summary": summary, "results": results, "labels": labels, "cpu_s": cpu, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    print_machine()
    work = scratch("savings")
    data = work / "rows.jsonl"
    write_rows(data, args.rows)
    sim = {"flavor": "openrouter", "batch": {"validating_polls": 0, "in_progress_polls": 1, "finalizing_polls": 0}}
    paths = [("sync, one by one, no caching", {**sim, "prefix_caching": False}, {"cache": "off", "mode": "sync"}),
             ("sync + caching", sim, {"cache": "auto", "mode": "sync"}),
             ("batch + caching", sim, {"cache": "auto", "mode": "batch"}),
             ("sync + caching + 10 rows/request", sim, {"cache": "auto", "mode": "sync", "rows_per_request": 10}),
             ("batch + caching + 10 rows/request", sim, {"cache": "auto", "mode": "batch", "rows_per_request": 10})]
    from pipeline.errors import ConfigError

    runs = []
    refused: list[tuple[str, str]] = []
    try:
        # A short run first, so imports and first-use costs are not billed to the baseline's CPU per row.
        warm = work / "warm.jsonl"
        write_rows(warm, 20)
        run_path("warm-up", sim, work, warm, args.concurrency, cache="auto", mode="sync", rows_per_request=1)
        for name, sim_cfg, how in paths:
            try:
                runs.append(run_path(name, sim_cfg, work, data, args.concurrency, **{"rows_per_request": 1, **how}))
            except ConfigError as exc:  # a combination this build refuses (said in the table)
                refused.append((name, str(exc).split(": ", 2)[-1]))
    finally:
        cleanup(work)
    base = runs[0]
    rows = []
    for r in runs:
        res, s = r["results"], r["summary"]
        per_m = float(res["cost_usd"].sum()) / max(1, res.height) * 1e6
        same = base["labels"].join(r["labels"], on="rid", suffix="_r")
        identical = (same["label"] == same["label_r"]).sum() / max(1, base["labels"].height)
        rows.append([r["name"], s.succeeded, round(per_m, 2), round(per_m / (float(base["results"]["cost_usd"].sum())
                     / max(1, base["results"].height) * 1e6), 3),
                     round(float(res["prompt_tokens"].mean() or 0)),
                     f"{res['cached_tokens'].sum() / max(1, res['prompt_tokens'].sum()):.0%}", f"{identical:.1%}",
                     round(r["cpu_s"] / max(1, s.succeeded) * 1e3, 3), round(r["wall_s"], 1)])
    for name, why in refused:
        rows.append([f"{name} (refused: {why[:90]})", "-", "-", "-", "-", "-", "-", "-", "-"])
    print(f"\n{args.rows:,} rows, ~1,500 shared + ~300 row tokens, one-word answer, {MODEL}, "
          f"max_concurrency {args.concurrency}\n")
    print(table(["path", "labels", "USD per 1M labels", "x baseline", "prompt tokens/label", "prompt cached",
                 "labels = baseline",
                 "client CPU ms/row", "wall s"], rows))


if __name__ == "__main__":
    main()
