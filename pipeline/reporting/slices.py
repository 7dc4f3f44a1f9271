"""The runs' figures per value of a carried column (`--by product`), each with the rows behind it.

Per slice: `rows` (ids any run answered) and `share` (of all compared rows). Per run, against gold:
`accuracy` over the slice's gold rows the run answered (an answer without the field counts as wrong, as in
the gold table) and `gold rows`, how many; review gold (`pipeline review import`) over-represents the
uncertain rows, so each gold row counts with its weight (its inverse chance of being reviewed) and the
slice's accuracy estimates the whole slice, as the gold table's does. Without gold: `agreement` with the
first run over the rows both answered, and `compared`, how many. The mean `confidence` of the run's rows.
With `quality.audit`: the audit's agreement with its reference model over the slice's audited rows and
`audited`, how many: figures from the seeded audit sample, not from every row.

The largest slices are listed, then one line for the remaining values and one for all rows (which
equals the whole-run figures above it).
"""
from __future__ import annotations

import polars as pl

SLICES = 20
OTHERS = "(other values)"
ALL = "(all rows)"


def slices(frame: pl.DataFrame, labels: list[str], field: str | None, limit: int = SLICES) -> pl.DataFrame:
    """The slice table of the wide frame (examples.wide): one line per value, largest first."""
    if "__by" not in frame.columns:
        return pl.DataFrame()
    aggs = _figures(frame, labels, field)
    frame = frame.with_columns(pl.col("__by").fill_null("(null)"))
    per = frame.group_by("__by").agg(aggs).sort(["rows", "__by"], descending=[True, False])
    parts = [per.head(limit)]
    if per.height > limit:
        rest = frame.join(per.head(limit).select("__by"), on="__by", how="anti")
        others = f"{OTHERS[:-1]}: {per.height - limit:,})"
        parts.append(rest.select(aggs).with_columns(pl.lit(others).alias("__by")))
    parts.append(frame.select(aggs).with_columns(pl.lit(ALL).alias("__by")))
    table = pl.concat([p.select(per.columns) for p in parts], how="vertical_relaxed")
    share = (pl.col("rows") / frame.height) if frame.height else pl.lit(None, dtype=pl.Float64)
    return (table.rename({"__by": "slice"}).with_columns(share.alias("share"))
            .select("slice", "rows", "share", *[c for c in table.columns if c not in ("__by", "rows")]))


def notes(frame: pl.DataFrame, field: str | None) -> list[str]:
    """What the reader needs to read the figures right: weighted gold, figures from the audit sample."""
    out = []
    if field and f"gold:{field}" in frame.columns:
        weighted = "__weight" in frame.columns and frame.filter(pl.col(f"gold:{field}").is_not_null()).get_column(
            "__weight").fill_null(1.0).n_unique() > 1
        out.append(f"Accuracy: of the slice's gold rows for {field} the run answered (gold rows: how many)"
                   + ("; reviewed rows count with their weight, the inverse of their chance of being reviewed, so "
                      "the figure estimates the whole slice." if weighted else "."))
    elif any(c.startswith(f"{field}@") for c in frame.columns):
        out.append("Agreement: with the first run, over the rows both answered (compared: how many).")
    if any(c.startswith("audit@") for c in frame.columns):
        out.append("Audit agreement: from the audit's seeded sample only (audited: how many of the slice's rows "
                   "the reference model also answered), not from every row.")
    return out


def _figures(frame: pl.DataFrame, labels: list[str], field: str | None) -> list[pl.Expr]:
    aggs: list[pl.Expr] = [pl.len().cast(pl.Int64).alias("rows")]
    gold = f"gold:{field}" if field else None
    weight = pl.col("__weight").fill_null(1.0) if "__weight" in frame.columns else pl.lit(1.0)
    for i, label in enumerate(labels):
        answer = f"{field}@{i}"
        answered = pl.col(f"__answered@{i}").fill_null(False) if f"__answered@{i}" in frame.columns else \
            pl.col(answer).is_not_null() if answer in frame.columns else pl.lit(False)
        if gold and gold in frame.columns:
            scored = pl.col(gold).is_not_null() & answered
            right = pl.col(answer).fill_null("(no answer)") == pl.col(gold) if answer in frame.columns \
                else pl.lit(False)
            w = pl.when(scored).then(weight).otherwise(0.0)
            aggs += [(pl.when(w.sum() > 0).then((w * right.cast(pl.Float64)).sum() / w.sum()))
                     .alias(f"accuracy {label}"), scored.sum().cast(pl.Int64).alias(f"gold rows {label}")]
        elif i > 0 and answer in frame.columns and f"{field}@0" in frame.columns:
            both = pl.col(answer).is_not_null() & pl.col(f"{field}@0").is_not_null()
            aggs += [pl.when(both).then(pl.col(answer) == pl.col(f"{field}@0")).mean().alias(f"agreement {label}"),
                     both.sum().cast(pl.Int64).alias(f"compared {label}")]
        if f"confidence@{i}" in frame.columns:
            aggs.append(pl.col(f"confidence@{i}").mean().alias(f"confidence {label}"))
        if f"audit@{i}" in frame.columns:
            aggs += [pl.col(f"audit@{i}").cast(pl.Float64).mean().alias(f"audit agreement {label}"),
                     pl.col(f"audit@{i}").is_not_null().sum().cast(pl.Int64).alias(f"audited {label}")]
    return aggs
