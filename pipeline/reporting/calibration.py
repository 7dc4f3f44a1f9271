"""Calibration of a run's confidences against gold: reliability bins, expected calibration error, and
what each auto-accept threshold would let through.

A row is auto-accepted at threshold t when its confidence is >= t (the same rule a cascade stage's
`min_confidence` applies). Per field the confidence is that field's own (`confidence_by_field.<field>`)
when the results carry it, else the row's `confidence` (its lowest field confidence).

- Bins: 10 equal-width bins over [0, 1]; a confidence c falls in bin min(floor(10 c), 9), so 1.0 is in
  the last bin. Per bin: rows, mean confidence, accuracy (share of rows whose answer equals the gold).
- ECE = sum over bins of rows_b / rows * |accuracy_b - mean_confidence_b| (Guo et al. 2017).
- Thresholds: `accepted_share` is over every answered row with a confidence (no gold needed: it is the
  share of the job that would skip review); `precision` is over the gold rows at or above t, with a
  Wilson 95% interval, because a precision measured on 12 rows says little.
- Weights: gold from `pipeline review export` is a census of the uncertain rows plus a random sample of
  the rest, so each gold row carries the inverse of its chance of being reviewed (1 for an uncertain
  row, rest / sample for a sampled one). Accuracies, precisions and the ECE are weighted means, so they
  estimate the whole job, not the review pile; the Wilson interval uses the effective sample size
  (sum w)^2 / sum w^2. A gold column weighs every row 1, which is the plain unweighted figure.
- `--target-precision P` names the lowest threshold (among the grid and every confidence seen on a gold
  row) whose measured precision is >= P on at least MIN_GOLD_ROWS accepted gold rows: the one that
  auto-accepts the most rows while meeting it. Fewer rows measure nothing worth naming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

BINS = 10
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99)
Z95 = 1.959963984540054
MIN_GOLD_ROWS = 10


@dataclass
class Calibration:
    """One run's calibration on one gold field."""

    run: str
    field: str
    confidence: str               # which column: "confidence_by_field.<field>" or "confidence"
    rows: int                     # gold rows with an answer and a confidence
    no_confidence: int            # gold rows with an answer but no confidence (left out)
    ece: float | None
    bins: pl.DataFrame            # bin, lo, hi, rows, mean_confidence, accuracy, gap
    # threshold, accepted_share, accepted_rows, gold_rows, precision, precision_low, precision_high
    thresholds: pl.DataFrame
    target: float | None = None
    chosen: dict[str, float | int | None] | None = None   # the threshold row --target-precision names


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a share k / n (None, None when n is 0)."""
    return wilson_share(k / n if n else 0.0, float(n), z)


def wilson_share(p: float, n: float, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson interval of a share p measured on n rows (n may be an effective, fractional size)."""
    if n <= 0:
        return None, None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _weights(weight: pl.Series | None, n: int) -> pl.Series:
    return pl.Series("w", [1.0] * n, dtype=pl.Float64) if weight is None else weight.cast(pl.Float64).fill_null(1.0)


def _wmean(x: str) -> pl.Expr:
    return (pl.col(x) * pl.col("w")).sum() / pl.col("w").sum()


def reliability(conf: pl.Series, correct: pl.Series, weight: pl.Series | None = None
                ) -> tuple[pl.DataFrame, float | None]:
    """Bins and ECE over rows with a confidence (nulls and NaNs must be removed by the caller)."""
    df = pl.DataFrame({"c": conf.cast(pl.Float64).clip(0.0, 1.0), "ok": correct.cast(pl.Float64),
                       "w": _weights(weight, conf.len())})
    n = df.height
    total = float(df.get_column("w").sum()) if n else 0.0
    binned = (df.with_columns(bin=(pl.col("c") * BINS).floor().clip(0, BINS - 1).cast(pl.Int64))
              .group_by("bin").agg(rows=pl.len(), weight=pl.col("w").sum(), mean_confidence=_wmean("c"),
                                   accuracy=_wmean("ok")))
    full = (pl.DataFrame({"bin": list(range(BINS))}, schema={"bin": pl.Int64})
            .join(binned, on="bin", how="left")
            .with_columns(lo=pl.col("bin") / BINS, hi=(pl.col("bin") + 1) / BINS,
                          rows=pl.col("rows").fill_null(0).cast(pl.Int64))
            .with_columns(gap=(pl.col("accuracy") - pl.col("mean_confidence")))
            .select("bin", "lo", "hi", "rows", "mean_confidence", "accuracy", "gap"))
    if n == 0 or total <= 0:
        return full, None
    weights = binned.select("bin", "weight")
    ece = float(full.join(weights, on="bin", how="left")
                .select((pl.col("weight") / total * pl.col("gap").abs()).fill_null(0.0).sum()).item())
    return full, ece


def threshold_table(population: pl.Series, conf: pl.Series, correct: pl.Series, thresholds: list[float],
                    weight: pl.Series | None = None) -> pl.DataFrame:
    """Per threshold: the share of all answered rows accepted, and the (weighted) precision on the gold
    rows accepted."""
    pop = population.cast(pl.Float64)
    total = pop.len()
    w = _weights(weight, conf.len())
    ok = correct.cast(pl.Float64)
    rows = []
    for t in sorted(set(thresholds)):
        accepted = int((pop >= t).sum()) if total else 0
        mask = conf >= t
        n = int(mask.sum())
        wa = w.filter(mask)
        sw, sw2 = float(wa.sum()), float((wa * wa).sum())
        precision = float((ok.filter(mask) * wa).sum()) / sw if n and sw > 0 else None
        n_eff = sw * sw / sw2 if sw2 > 0 else 0.0
        low, high = wilson_share(precision, n_eff) if precision is not None else (None, None)
        rows.append({"threshold": float(t), "accepted_share": accepted / total if total else None,
                     "accepted_rows": accepted, "gold_rows": n, "precision": precision,
                     "precision_low": low, "precision_high": high})
    return pl.DataFrame(rows, schema={"threshold": pl.Float64, "accepted_share": pl.Float64,
                                      "accepted_rows": pl.Int64, "gold_rows": pl.Int64, "precision": pl.Float64,
                                      "precision_low": pl.Float64, "precision_high": pl.Float64})


def calibrate(run: str, field: str, source: str, population: pl.Series, scored: pl.DataFrame,
              target: float | None = None, min_rows: int = MIN_GOLD_ROWS) -> Calibration:
    """`scored`: one row per gold row the run answered, columns `conf` (Float64, may be null), `correct`
    (Boolean) and optionally `weight`; `population`: the confidence of every answered row."""
    known = scored.filter(pl.col("conf").is_not_null() & pl.col("conf").is_not_nan())
    conf, correct = known.get_column("conf").cast(pl.Float64), known.get_column("correct").cast(pl.Boolean)
    weight = known.get_column("weight") if "weight" in known.columns else None
    bins, ece = reliability(conf, correct, weight)
    pop = population.cast(pl.Float64).drop_nulls().drop_nans()
    grid = list(THRESHOLDS) + ([target] if target is not None else [])
    table = threshold_table(pop, conf, correct, grid, weight)
    result = Calibration(run, field, source, known.height, scored.height - known.height, ece, bins, table, target)
    if target is not None and known.height:
        candidates = threshold_table(pop, conf, correct, grid + conf.unique().to_list(), weight)
        ok = candidates.filter((pl.col("precision") >= target - 1e-12) & (pl.col("gold_rows") >= min_rows)
                               ).sort("threshold")
        result.chosen = ok.row(0, named=True) if ok.height else None
    return result
