"""Gold labels: a carried input column (`--gold COLUMN[=FIELD]`) or the human labels `pipeline review
import` stored beside the job (`gold.parquet`), as one frame the report scores every run against.

gold.parquet holds one row per (row id, field): `row_id`, `field`, `value` (text: an enum value, or
"true"/"false"), `annotator`, `annotated_at`, `reason` (why the row was up for review: below the
confidence threshold or the random sample), `weight` (the inverse of the row's chance of being up for
review: 1 below the threshold, rows-not-below / sample-size in the random sample; the report weighs
scores by it so they estimate the whole job), `source` (the file imported) and `imported_at`. A later
import of the same (row id, field) replaces the earlier label. The file sits in output.dir next to the
results; `--force-new` leaves it there (the labels describe the input, not the job's prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..common import layout, safefs
from ..errors import UsageError
from .data import RunData

GOLD_SCHEMA = {"row_id": pl.String, "field": pl.String, "value": pl.String, "annotator": pl.String,
               "annotated_at": pl.String, "reason": pl.String, "weight": pl.Float64, "source": pl.String,
               "imported_at": pl.String}


@dataclass
class Gold:
    """Gold values keyed by row id (`__id`, text), one text column per scored output field, and the
    row's `__weight` (1 unless review gold over-represents some rows)."""

    frame: pl.DataFrame
    fields: list[str]
    source: str            # how the report names it: "input column gold_sentiment", "human review (gold.parquet)"

    def column(self, name: str) -> pl.DataFrame:
        """__id and `gold` for one field, rows with a value only."""
        return self.frame.select("__id", pl.col(name).alias("gold"), pl.col("__weight").alias("weight")
                                 ).drop_nulls("gold")


def read_gold(out_dir: Path) -> pl.DataFrame:
    """The stored labels (empty, with the schema, when there are none)."""
    path = out_dir / layout.GOLD
    if not path.exists():
        return pl.DataFrame(schema=GOLD_SCHEMA)
    safefs.check_not_link(path)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which and what to do
        raise UsageError(f"{path} cannot be read as gold labels ({type(exc).__name__}: {exc}); move it away "
                         "and import the annotations again with `pipeline review import`") from None
    missing = sorted(set(GOLD_SCHEMA) - set(df.columns))
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)}: it was not written by "
                         "`pipeline review import`; move it away and import again")
    return df.select([pl.col(c).cast(t) for c, t in GOLD_SCHEMA.items()])


def write_gold(out_dir: Path, labels: pl.DataFrame) -> pl.DataFrame:
    """Merge new labels into gold.parquet (new ones win per row id and field); returns the whole set."""
    old = read_gold(out_dir)
    merged = (pl.concat([old, labels.select(list(GOLD_SCHEMA))], how="vertical")
              .unique(subset=["row_id", "field"], keep="last", maintain_order=True)
              .sort("row_id", "field"))
    with safefs.atomic_writer(out_dir / layout.GOLD) as fh:
        merged.write_parquet(fh)
    return merged


def stored_gold(runs: list[RunData]) -> Gold | None:
    """The labels stored beside any of the runs (the first folder's label wins where two disagree)."""
    frames = [read_gold(run.path) for run in runs]
    long = pl.concat(frames, how="vertical").unique(subset=["row_id", "field"], keep="first", maintain_order=True)
    if long.height == 0:
        return None
    wide = long.pivot(on="field", index="row_id", values="value").rename({"row_id": "__id"})
    fields = [c for c in wide.columns if c != "__id"]
    weights = long.group_by("row_id").agg(pl.col("weight").fill_null(1.0).first().alias("__weight"))
    wide = wide.join(weights.rename({"row_id": "__id"}), on="__id", how="left")
    named = [str(r.path / layout.GOLD) for r, f in zip(runs, frames) if f.height]
    return Gold(wide, fields, f"human labels ({', '.join(named)})")


def column_gold(runs: list[RunData], spec: str) -> Gold:
    """--gold COLUMN[=FIELD]: a carried input column, read from every run that carries it."""
    column, _, wanted = spec.partition("=")
    frames = []
    for run in runs:
        name = next((n for n in (column, f"input.{column}") if n in run.results.columns), None)
        if name is None:
            continue
        frames.append(run.results.select(pl.col(run.id_column).cast(pl.String).alias("__id"),
                                         pl.col(name).cast(pl.String).alias("__gold")))
    if not frames:
        raise UsageError(f"--gold {column}: {runs[0].path}/results.parquet has no column {column!r}; carry it from "
                         f"the input with input.columns: [{column}] (and re-run, which sends nothing new)")
    values = pl.concat(frames).drop_nulls("__gold").unique(subset="__id", keep="first", maintain_order=True)
    field = wanted or _gold_field(runs, values.get_column("__gold"), column)
    if not any(field in run.outputs().columns for run in runs):
        fields = sorted({c for run in runs for c in run.outputs().columns})
        raise UsageError(f"--gold {spec}: no run has an output field {field!r}; give COLUMN=FIELD with one of: "
                         f"{', '.join(fields)}")
    return Gold(values.rename({"__gold": field}).with_columns(__weight=pl.lit(1.0)), [field], f"input column {column}")


def _gold_field(runs: list[RunData], gold: pl.Series, column: str) -> str:
    """The output field a gold column scores: the same name, else the label field sharing most of its values."""
    out = runs[0].outputs()
    if column in out.columns:
        return column
    values = set(gold.drop_nulls().cast(pl.String).to_list())
    best, overlap = None, 0
    for name in out.columns:
        dtype = out.schema[name]
        if isinstance(dtype, (pl.Categorical, pl.Enum)) or dtype in (pl.Boolean, pl.String):
            shared = len(values & set(out.get_column(name).drop_nulls().cast(pl.String).to_list()))
            if shared > overlap:
                best, overlap = name, shared
    if best is None:
        raise UsageError(f"--gold {column}: no output field shares values with it; name one as {column}=FIELD")
    return best
