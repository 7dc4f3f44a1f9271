"""Cascade benchmark: accuracy and cost of the weak model alone, the strong model alone, and the cascade.

    python benchmarks/cascade.py [--rows 5000] [--threshold 0.9] [--audit-share 0.05] [--rows-per-request 10]
                                 [--long-instructions]
        [--batch]

5,000 rows with gold on the built-in simulator, whose models have an accuracy against a truth derived
from each row (pipeline_simulator/judge.py: gpt-4o-mini 0.90, gpt-4o 0.95 of enum/boolean fields right)
and calibrated logprobs. Gold is that truth, computed from the row's text with the simulator's own
`truth_of`. Three jobs run through the real pipeline (`pipeline.run`), each in its own folder:

    weak      openai/gpt-4o-mini on every row
    strong    openai/gpt-4o on every row
    cascade   gpt-4o-mini first; rows under --threshold confidence (logprobs) go to gpt-4o; an audit of
              --audit-share of the rows by gpt-4o
    cascade-batch  (--batch) the same cascade in run.mode: batch through the simulator's Batch API (files
              of 50,000 lines, every batch done at its first poll): its decisions must equal the sync
              cascade's, at the batch price (half)

With --rows-per-request K a fourth job runs the same cascade and audit with K rows per request at every
stage (`prompt.rows_per_request`: each row's confidence from its own part of the packed answer's
logprobs), and the table says how many of its labels equal the one-by-one cascade's. Packs share the
instructions once per pack but add a wrapper per row to the answer ({"id": ..., "answer": ...}), so they
pay off when the shared part is long: --long-instructions replaces the one-line system prompt with ~1,500
tokens of instructions and examples (the savings benchmark's workload) in every job.

Accuracy is the share of (row, field) answers equal to gold over both fields (sentiment: 3 values, spam:
boolean). Cost is what the pipeline charged (summary cost_usd, the audit's included for the cascade and
shown apart). The audit's 95% interval per field is checked against the true agreement of the cascade
with gpt-4o on every row (the strong job's answers). Target: cascade within 1 point of the strong
model's accuracy at <= 40% of its cost, and the interval contains the true agreement.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
from _common import REPO  # noqa: F401  (puts the repo on sys.path)

import pipeline
from pipeline_simulator.judge import truth_of

WEAK, STRONG = "openai/gpt-4o-mini", "openai/gpt-4o"
ACCURACY = {WEAK: 0.90, STRONG: 0.95}
PRICES = {WEAK: {"input_per_m": 0.15, "output_per_m": 0.60}, STRONG: {"input_per_m": 2.50, "output_per_m": 10.00}}
FIELDS = {"sentiment": ["positive", "negative", "neutral"], "spam": [True, False]}
SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": FIELDS["sentiment"]},
                                           "spam": {"type": "boolean"}},
          "required": ["sentiment", "spam"], "additionalProperties": False}
PROMPT = {"system": "Label the review's sentiment and whether it is spam.", "user": "{{ text }}"}
WORDS = ["parcel", "late", "broken", "lovely", "refund", "again", "colour", "size", "cheap", "support", "box"]


def long_instructions() -> str:
    """~1,500 tokens shared by every row: the task, the labels, then examples (as benchmarks/savings.py)."""
    rng = random.Random(20)
    lines = ["Label the review's sentiment (positive, negative or neutral) and whether it is spam.",
             "Neutral means neither praise nor complaint outweighs the other. Spam is advertising or nonsense.",
             "Ignore shipping complaints unless the product itself is affected. Examples follow.", ""]
    for i in range(40):
        review = " ".join(rng.choice(WORDS) for _ in range(18))
        lines.append(f"Example {i + 1}: {review} -> {rng.choice(FIELDS['sentiment'])}, spam {rng.random() < 0.1}")
    return "\n".join(lines)


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            text = f"Review {i}: " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8))
            gold = {name: truth_of(text, name, values) for name, values in FIELDS.items()}
            fh.write(json.dumps({"rid": f"r{i:06d}", "text": text, "gold_sentiment": gold["sentiment"],
                                 "gold_spam": gold["spam"]}) + "\n")


def config(data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": str(data), "id_column": "rid", "columns": ["gold_sentiment", "gold_spam"],
                  "batch_size": 500},
        "endpoint": {"base_url": "simulator", "model": WEAK,
                     "simulator": {"accuracy": ACCURACY, "prices": PRICES, "retry_after_s": 0.01}},
        "prompt": dict(PROMPT),
        "params": {"temperature": 0, "max_tokens": 60},
        "structured": {"schema": SCHEMA, "mode": "json_schema"},
        "limits": {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrency": 64},
        "output": {"dir": str(out)},
        "prices": PRICES,
        "run": {"progress": False},
    }
    cfg.update(extra)
    return cfg


def answers(out: Path) -> pl.DataFrame:
    df = pl.read_parquet(out / "results.parquet")
    return df.select("rid", "gold_sentiment", "gold_spam", pl.col("output").struct.field("sentiment"),
                     pl.col("output").struct.field("spam"), *[c for c in ("cascade_stage",) if c in df.columns])


def accuracy(df: pl.DataFrame) -> float:
    right = (df["sentiment"] == df["gold_sentiment"]).sum() + (df["spam"] == df["gold_spam"]).sum()
    return right / (2 * df.height)


def same_labels(a: pl.DataFrame, b: pl.DataFrame) -> float:
    """The share of rows whose labels (every field) are the same in two runs."""
    joined = a.join(b, on="rid", suffix="_b")
    same = (joined["sentiment"] == joined["sentiment_b"]) & (joined["spam"] == joined["spam_b"])
    return float(same.mean() or 0.0)


def run(name: str, cfg: dict[str, Any]) -> tuple[pipeline.Summary, float]:
    started = time.monotonic()
    summary = pipeline.run(cfg, quiet=True)
    wall = time.monotonic() - started
    assert summary.succeeded == summary.rows_total, f"{name}: {summary.failed} failed, {summary.pending} pending"
    return summary, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--audit-share", type=float, default=0.05)
    ap.add_argument("--rows-per-request", type=int, default=1,
                    help="also run the cascade with this many rows per request (1: not)")
    ap.add_argument("--long-instructions", action="store_true",
                    help="a ~1,500-token shared system prompt in every job instead of one line")
    ap.add_argument("--batch", action="store_true", help="also run the cascade in run.mode: batch")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "reviews.jsonl"
        write_input(data, args.rows)
        trust = {"quality": {"confidence": "logprobs",
                             "audit": {"share": args.audit_share, "model": STRONG, "min_agreement": 0.95}},
                 "cascade": [{"model": WEAK, "min_confidence": args.threshold}, {"model": STRONG}]}
        if args.long_instructions:
            PROMPT["system"] = long_instructions()
        jobs = {"weak": config(data, root / "weak"),
                "strong": config(data, root / "strong", endpoint={**config(data, root)["endpoint"], "model": STRONG}),
                "cascade": config(data, root / "cascade", **trust)}
        k = args.rows_per_request
        if k > 1:
            prompt = {**config(data, root)["prompt"], "rows_per_request": k}
            jobs[f"cascade, {k} rows per request"] = config(data, root / "packed", prompt=prompt, **trust)
        if args.batch:
            instant = {"validating_polls": 0, "in_progress_polls": 0, "finalizing_polls": 0}
            endpoint = {**config(data, root)["endpoint"]}
            endpoint["simulator"] = {**endpoint["simulator"], "batch": instant}
            jobs["cascade-batch"] = config(data, root / "cascade-batch", **trust, endpoint=endpoint,
                                           run={"progress": False, "mode": "batch"},
                                           batch={"poll_interval_s": 0.01, "poll_max_interval_s": 0.05})
            if k > 1:
                jobs[f"cascade-batch, {k} rows per request"] = config(
                    data, root / "packed-batch", **trust, endpoint=endpoint, prompt=prompt,
                    run={"progress": False, "mode": "batch"}, batch={"poll_interval_s": 0.01,
                                                                     "poll_max_interval_s": 0.05})
        folders = {name: Path(cfg["output"]["dir"]) for name, cfg in jobs.items()}
        figures = {name: run(name, cfg) for name, cfg in jobs.items()}
        frames = {name: answers(folders[name]) for name in jobs}
        strong_cost = figures["strong"][0].cost_usd
        print(f"{args.rows} rows, threshold {args.threshold}, audit share {args.audit_share}, "
              f"{'~1,500-token' if args.long_instructions else 'one-line'} shared instructions")
        print("| run | accuracy | cost (USD) | cost vs strong | requests | wall (s) | labels = cascade's |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, (s, wall) in figures.items():
            same = same_labels(frames[name], frames["cascade"]) if name.startswith("cascade") else None
            print(f"| {name} | {accuracy(frames[name]):.4f} | {s.cost_usd:.4f} | {s.cost_usd / strong_cost:.1%} | "
                  f"{s.requests_sent} | {wall:.1f} | {'' if same is None else f'{same:.2%}'} |")
        casc, strong = frames["cascade"], frames["strong"].rename({"sentiment": "s_sentiment", "spam": "s_spam"})
        stages = casc["cascade_stage"].value_counts().sort("cascade_stage")
        print("cascade rows per stage:", dict(stages.iter_rows()))
        if args.batch:
            key = ["rid", "sentiment", "spam", "cascade_stage"]
            same = frames["cascade-batch"].select(key).sort("rid").equals(casc.select(key).sort("rid"))
            print(f"cascade-batch: decisions {'equal to' if same else 'DIFFERENT from'} the sync cascade's, at "
                  f"{figures['cascade-batch'][0].cost_usd / figures['cascade'][0].cost_usd:.1%} of its cost")
        joined = casc.join(strong.select("rid", "s_sentiment", "s_spam"), on="rid")
        audit = figures["cascade"][0].quality["audit"]
        ok = True
        for name in FIELDS:
            true = (joined[name] == joined[f"s_{name}"]).mean()
            f = audit["fields"][name]
            low, high = f["interval_95"]
            inside = low <= true <= high
            ok &= inside
            print(f"audit {name}: {f['agree']}/{f['rows']} = {f['agreement']:.4f}, 95% [{low:.4f}, {high:.4f}]; "
                  f"true agreement with {STRONG} on all rows {true:.4f} ({'inside' if inside else 'OUTSIDE'})")
        gap = accuracy(frames["strong"]) - accuracy(casc)
        share = figures["cascade"][0].cost_usd / strong_cost
        print(f"gate (min_agreement 0.95): exit {figures['cascade'][0].exit_code}, "
              f"{figures['cascade'][0].quality.get('gate')}")
        print(f"cascade: {gap * 100:+.2f} points under strong at {share:.1%} of its cost "
              f"(target: <= 1 point at <= 40%): {'met' if gap <= 0.01 and share <= 0.40 and ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
