"""The report's numbers, computed with polars from one RunData: run totals, time, failures, output fields.

Charts are drawn from these small aggregated frames (never from the rows themselves), so a 1M-row job
makes a report as small and as quick as a 1,000-row one, and every figure shown is one computed here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from .data import RunData

QUANTILES = (0.5, 0.9, 0.99)
HIST_BINS = 20
TAIL_FACTOR = 1.5  # latency bars stop at 1.5 x p99; slower requests are counted in the last bar
TOP_VALUES = 15
EXAMPLES = 3
EXAMPLE_CHARS = 2000


def run_figures(run: RunData) -> dict[str, Any]:
    """Totals from summary.json (the run's own account), falling back to the outputs when it is absent."""
    s = run.summary
    succeeded = int(s.get("succeeded", run.results.height))
    failed = int(s.get("failed", run.failures.height))
    done = succeeded + failed
    wall = float(s.get("wall_s") or 0.0)
    cost = float(s.get("cost_usd", _sum(run.results, "cost_usd") + _sum(run.failures, "cost_usd")))
    this_run = done - int(s.get("resumed_rows") or 0)
    return {
        "rows_total": int(s.get("rows_total", done)), "succeeded": succeeded, "failed": failed,
        "pending": int(s.get("pending", 0)), "cost_usd": cost, "run_cost_usd": float(s.get("run_cost_usd", cost)),
        "prompt_tokens": int(s.get("prompt_tokens", _sum(run.results, "prompt_tokens"))),
        "completion_tokens": int(s.get("completion_tokens", _sum(run.results, "completion_tokens"))),
        "requests_sent": int(s.get("requests_sent", 0)), "retries": dict(s.get("retries") or {}),
        "wall_s": wall, "rows_per_s": this_run / wall if wall > 0 else None, "rows_done_run": this_run,
        "cost_per_1k_rows": cost / done * 1000 if done else None,
        "cache_hits": int(s.get("cache_hits", 0)), "deduplicated": int(s.get("deduplicated", 0)),
        "exit_code": s.get("exit_code"), "stopped": s.get("stopped"), "stop_message": s.get("stop_message"),
        "structured_mode": (s.get("structured") or {}).get("mode"), "model": run.model,
        **_prompt_cache(s, run),
    }


def _prompt_cache(s: dict[str, Any], run: RunData) -> dict[str, Any]:
    """The provider's prompt cache: share of prompt tokens read from it and what that saved (summary.json's
    prompt_cache; the results' cached_tokens when the summary predates it)."""
    raw = s.get("prompt_cache")
    pc: dict[str, Any] = raw if isinstance(raw, dict) else {}
    cached = int(pc.get("cached_tokens", _sum(run.results, "cached_tokens")))
    prompt = int(s.get("prompt_tokens", _sum(run.results, "prompt_tokens")))
    return {"cached_tokens": cached, "cache_hit_share": float(pc.get("hit_share", cached / prompt if prompt else 0.0)),
            "cache_saved_usd": float(pc["saved_usd"]) if "saved_usd" in pc else None}


def job_totals(run: RunData) -> dict[str, Any]:
    """The whole job across its runs (history.jsonl): runs, requests sent, wall time. Without a history
    the job is this one run as summary.json tells it."""
    if not run.history:
        s = run.summary
        return {"runs": 1 if s else None, "requests": s.get("requests_sent"), "wall_s": s.get("wall_s")}
    wall = 0.0
    for h in run.history:
        lo, hi = _epoch(h.get("started_at")), _epoch(h.get("finished_at"))
        if lo is not None and hi is not None and hi >= lo:
            wall += hi - lo
    requests = sum(int(h["requests"]) for h in run.history if isinstance(h.get("requests"), int))
    return {"runs": len(run.history), "requests": requests, "wall_s": wall}


@dataclass
class TimeFigures:
    requests: int                       # stored answers timed (all runs of the job)
    latency: dict[str, float | None]    # p50, p90, p99, mean (seconds) over answered requests
    latency_hist: pl.DataFrame          # start, end, count
    throughput: pl.DataFrame            # t_s (bin start, seconds from the window's first answer), per_s
    pauses: list[dict[str, float]]      # t_s, seconds (429 pauses from pipeline.log, in the window)
    scope: str                          # which answers the throughput covers


def time_figures(run: RunData, bins: int = 40) -> TimeFigures:
    """Latency over every stored answer; throughput over the last run (history.jsonl) or all answers."""
    t = run.timings.filter(~pl.col("cache_hit") & (pl.col("created_at") > 0))
    ok = t.filter((pl.col("state") == "ok") & pl.col("latency_s").is_not_null()).get_column("latency_s")
    latency: dict[str, float | None] = {f"p{round(q * 100)}": _num(ok.quantile(q, "linear")) for q in QUANTILES}
    latency["mean"] = _num(ok.mean())
    # A long tail would squeeze the body of the distribution into one bar: the last bar holds the tail.
    top = latency["p99"] * TAIL_FACTOR if latency["p99"] else None
    scope, window = "every stored answer", t
    last = run.history[-1] if run.history else {}
    lo, hi = _epoch(last.get("started_at")), _epoch(last.get("finished_at"))
    if lo is not None and hi is not None:
        in_run = t.filter(pl.col("created_at").is_between(lo, hi))
        if in_run.height:  # a resume that sent nothing keeps the whole picture
            scope, window = f"the last run ({last.get('run_id')})", in_run
    throughput, pauses = _throughput(window.get_column("created_at"), run.events_named("rate_pause"), bins)
    return TimeFigures(t.height, latency, histogram(ok, upper=top), throughput, pauses, scope)


def _throughput(created: pl.Series, pause_events: list[dict[str, Any]], bins: int
                ) -> tuple[pl.DataFrame, list[dict[str, float]]]:
    if created.len() == 0:
        return pl.DataFrame({"t_s": [], "per_s": []}, schema={"t_s": pl.Float64, "per_s": pl.Float64}), []
    start, end = float(created.min()), float(created.max())  # type: ignore[arg-type]
    width = max((end - start) / bins, 1e-3)
    counts = (((created - start) / width).floor().clip(0, bins - 1).cast(pl.Int64).rename("bin")
              .to_frame().group_by("bin").len())
    full = pl.DataFrame({"bin": list(range(bins))}, schema={"bin": pl.Int64}).join(counts, on="bin", how="left")
    throughput = full.select((pl.col("bin") * width).alias("t_s"), (pl.col("len").fill_null(0) / width).alias("per_s"))
    pauses = []
    for e in pause_events:
        when, seconds = _epoch(e.get("ts")), e.get("seconds")
        if when is not None and isinstance(seconds, (int, float)) and start - 60 <= when <= end:
            pauses.append({"t_s": max(when - start, 0.0), "seconds": float(seconds)})
    return throughput, pauses


def failure_figures(run: RunData) -> tuple[pl.DataFrame, dict[str, list[dict[str, Any]]]]:
    """Failures by (class, status), and the first few of each class with message and raw content."""
    f = run.failures
    if f.height == 0 or "error_class" not in f.columns:
        return pl.DataFrame({"error_class": [], "status": [], "rows": []}), {}
    by = f.group_by("error_class", "status").agg(pl.len().alias("rows")).sort(["rows", "error_class"],
                                                                              descending=[True, False])
    examples: dict[str, list[dict[str, Any]]] = {}
    cols = [c for c in (run.id_column, "status", "message", "content", "attempts") if c in f.columns]
    for (error_class,), group in f.select(["error_class", *cols]).group_by("error_class", maintain_order=True):
        examples[str(error_class)] = [
            {**r, "content": _clip(r.get("content")), "message": _clip(r.get("message"))}
            for r in group.head(EXAMPLES).drop("error_class").iter_rows(named=True)
        ]
    return by, examples


@dataclass
class FieldSummary:
    """One output field, summarised as its type calls for."""

    name: str
    kind: str                      # enum | number | boolean | list | text | other
    rows: int                      # rows with a value
    nulls: int
    table: pl.DataFrame            # value/count, or start/end/count, or share table
    stats: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def field_summaries(outputs: pl.DataFrame, prefix: str = "") -> list[FieldSummary]:
    """Every typed field, nested ones included (`aspects[].polarity`), in schema order."""
    out: list[FieldSummary] = []
    for name in outputs.columns:
        s = outputs.get_column(name)
        label = f"{prefix}{name}"
        if isinstance(s.dtype, pl.Struct):
            out += field_summaries(s.struct.unnest(), prefix=f"{label}.")
        elif isinstance(s.dtype, pl.List) and isinstance(s.dtype.inner, pl.Struct):
            out.append(_list_lengths(label, s))
            out += field_summaries(s.explode().drop_nulls().struct.unnest(), prefix=f"{label}[].")
        else:
            out.append(summarize(label, s))
    return out


def summarize(name: str, s: pl.Series) -> FieldSummary:
    nulls, rows = s.null_count(), s.len() - s.null_count()
    dtype = s.dtype
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return FieldSummary(name, "enum", rows, nulls, value_counts(s.cast(pl.String)))
    if dtype == pl.Boolean:
        table = pl.DataFrame({"value": ["true", "false", "null"],
                              "count": [int(s.sum() or 0), int((~s).sum() or 0), nulls]})
        return FieldSummary(name, "boolean", rows, nulls, table.with_columns(share=pl.col("count") / max(s.len(), 1)))
    if dtype.is_numeric():
        v = s.drop_nulls().cast(pl.Float64)
        stats = {"mean": _num(v.mean()), "min": _num(v.min()), "p50": _num(v.quantile(0.5, "linear")),
                 "max": _num(v.max()), "std": _num(v.std())}
        return FieldSummary(name, "number", rows, nulls, histogram(v), stats)
    if isinstance(dtype, pl.List):
        summary = _list_lengths(name, s)
        summary.table = value_counts(s.explode().drop_nulls().cast(pl.String), TOP_VALUES)
        summary.kind = "list"
        return summary
    if dtype == pl.String:
        lengths = s.drop_nulls().str.len_chars().cast(pl.Float64)
        stats = {"mean_chars": _num(lengths.mean()), "p50_chars": _num(lengths.quantile(0.5, "linear")),
                 "max_chars": _num(lengths.max()), "distinct": s.drop_nulls().n_unique()}
        examples = [_clip(x, 300) or "" for x in s.drop_nulls().head(EXAMPLES).to_list()]
        return FieldSummary(name, "text", rows, nulls, histogram(lengths), stats, examples)
    return FieldSummary(name, "other", rows, nulls, value_counts(s.cast(pl.String), TOP_VALUES))


def _list_lengths(name: str, s: pl.Series) -> FieldSummary:
    lengths = s.drop_nulls().list.len()
    stats = {"mean_items": _num(lengths.mean()), "max_items": _num(lengths.max()),
             "empty": int((lengths == 0).sum())}
    table = value_counts(lengths).sort("value").with_columns(pl.col("value").cast(pl.String))
    return FieldSummary(name, "list_objects", s.len() - s.null_count(), s.null_count(), table, stats)


def value_counts(s: pl.Series, top: int | None = None) -> pl.DataFrame:
    """Counts per value, most common first (ties by value, so the order is stable)."""
    counts = (s.rename("value").to_frame().group_by("value").agg(pl.len().alias("count"))
              .sort(["count", "value"], descending=[True, False], nulls_last=True))
    counts = counts.with_columns(pl.col("count").cast(pl.Int64))
    return counts.head(top) if top else counts


def histogram(v: pl.Series, bins: int = HIST_BINS, *, upper: float | None = None) -> pl.DataFrame:
    """Equal-width bins over [min, max] (max: `upper` when lower); the last bin also counts everything
    above, so the counts always add up to the values given."""
    v = v.drop_nulls().cast(pl.Float64).drop_nans()
    if v.len() == 0:
        return pl.DataFrame({"start": [], "end": [], "count": []}, schema={"start": pl.Float64, "end": pl.Float64,
                                                                          "count": pl.Int64})
    lo, hi = float(v.min()), float(v.max())  # type: ignore[arg-type]
    if upper is not None and lo < upper < hi:
        hi = upper
    if hi == lo:
        return pl.DataFrame({"start": [lo], "end": [hi], "count": [v.len()]},
                            schema={"start": pl.Float64, "end": pl.Float64, "count": pl.Int64})
    if (v == v.floor()).all() and hi - lo < 2 * bins:
        bins, width = int(hi - lo) + 1, 1.0  # small integers (list lengths, stars): one bar per value
    else:
        width = (hi - lo) / bins
    idx = ((v.cast(pl.Float64) - lo) / width).floor().clip(0, bins - 1).cast(pl.Int64)
    counts = idx.rename("bin").to_frame().group_by("bin").len()
    full = pl.DataFrame({"bin": list(range(bins))}, schema={"bin": pl.Int64}).join(counts, on="bin", how="left")
    return full.select((lo + pl.col("bin") * width).alias("start"), (lo + (pl.col("bin") + 1) * width).alias("end"),
                       pl.col("len").fill_null(0).cast(pl.Int64).alias("count"))


def _sum(df: pl.DataFrame, column: str) -> float:
    return float(df.get_column(column).sum()) if column in df.columns and df.height else 0.0


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _clip(text: Any, limit: int = EXAMPLE_CHARS) -> str | None:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _epoch(ts: Any) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
