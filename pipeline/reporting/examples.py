"""Rows a reader looks at when comparing runs: where the runs disagree and a sample of rows side by side;
the runs' figures per slice of a carried column (`--by product`) are slices.py's.

All of them work on one wide frame: the row id, each run's answer to every compared field (`<field>@<i>`
for run i), whether run i answered the row at all (`__answered@<i>`), each run's row confidence
(`confidence@<i>`), its audit's agreement on the sliced field (`audit@<i>`, null for rows not audited),
the gold values with each gold row's weight (`__weight`) and the --by column. Rows are matched by id
across runs; a row some run did not answer shows a null there.
"""
from __future__ import annotations

import polars as pl

from ..errors import UsageError
from .data import RunData
from .gold import Gold

DISAGREEMENTS = 12
SAMPLES = 10
SEED = 0


def wide(runs: list[RunData], fields: list[str], gold: Gold | None, by: str | None,
         audit_field: str | None = None) -> pl.DataFrame:
    """One row per id answered by any run: answers per run, confidences, audits, gold and the slice column."""
    frame: pl.DataFrame | None = None
    for i, run in enumerate(runs):
        res = run.results
        if res.height == 0:
            continue
        out = run.outputs()
        cols = [res.get_column(run.id_column).cast(pl.String).alias("__id"),
                pl.Series(f"__answered@{i}", [True] * res.height, dtype=pl.Boolean)]
        cols += [out.get_column(f).cast(pl.String).alias(f"{f}@{i}") for f in fields if f in out.columns]
        if "confidence" in res.columns:
            cols.append(res.get_column("confidence").cast(pl.Float64).alias(f"confidence@{i}"))
        audit = res.schema.get("audit_agrees")
        if audit_field and isinstance(audit, pl.Struct) and audit_field in [f.name for f in audit.fields]:
            cols.append(res.get_column("audit_agrees").struct.field(audit_field).cast(pl.Boolean).alias(f"audit@{i}"))
        if by is not None and (name := _by_column(run, by)) is not None:
            cols.append(res.get_column(name).cast(pl.String).alias(f"__by@{i}"))
        part = pl.DataFrame(cols)
        frame = part if frame is None else frame.join(part, on="__id", how="full", coalesce=True)
    if frame is None:
        return pl.DataFrame({"__id": []}, schema={"__id": pl.String})
    if by is not None:
        bys = [c for c in frame.columns if c.startswith("__by@")]
        if not bys:
            raise UsageError(f"--by {by}: no run's results.parquet has the column {by!r}; carry it from the input "
                             f"with input.columns: [{by}] (a re-run sends nothing new)")
        frame = frame.with_columns(pl.coalesce(bys).alias("__by")).drop(bys)
    if gold is not None:
        frame = frame.join(gold.frame.rename({f: f"gold:{f}" for f in gold.fields}), on="__id", how="left")
    return frame.sort("__id")


def _by_column(run: RunData, by: str) -> str | None:
    return next((c for c in (by, f"input.{by}") if c in run.results.columns), None)


def disagreements(frame: pl.DataFrame, fields: list[str], n_runs: int, limit: int = DISAGREEMENTS) -> pl.DataFrame:
    """Rows where the runs' answers differ on any field (or, with one run, differ from the gold); rows
    with a gold value first, then by id."""
    tests = []
    for f in fields:
        answers = [f"{f}@{i}" for i in range(n_runs) if f"{f}@{i}" in frame.columns]
        if n_runs > 1 and len(answers) > 1:
            tests.append(pl.concat_list(answers).list.drop_nulls().list.n_unique() > 1)
        gold = f"gold:{f}"
        if gold in frame.columns:
            tests += [pl.col(a).is_not_null() & pl.col(gold).is_not_null() & (pl.col(a) != pl.col(gold))
                      for a in answers]
    if not tests:
        return frame.head(0)
    golds = [c for c in frame.columns if c.startswith("gold:")]
    has_gold = pl.any_horizontal([pl.col(g).is_not_null() for g in golds]) if golds else pl.lit(False)
    return (frame.filter(pl.any_horizontal(tests)).with_columns(__g=has_gold)
            .sort(["__g", "__id"], descending=[True, False]).drop("__g").head(limit))


def samples(frame: pl.DataFrame, limit: int = SAMPLES) -> pl.DataFrame:
    """A seeded random sample of rows, in id order (the same rows on every report of these folders)."""
    if frame.height <= limit:
        return frame
    return frame.sample(n=limit, seed=SEED).sort("__id")
