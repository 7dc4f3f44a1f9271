"""`pipeline review export | import`: send the uncertain rows (and a random audit sample) to human
reviewers as Label Studio tasks, and bring their labels back as the job's gold.

    pipeline review export OUT --below 0.8 --sample 50 -o tasks.json   # + tasks.csv, tasks.label_config.xml
    pipeline review import OUT annotations.json                        # or the CSV, filled in

Export picks every answered row whose `confidence` is under --below (lowest first), then --sample rows
drawn at random (seeded by --seed) from the other answered rows, so the sample measures the rows that
would have been accepted without review. Import checks every label against the job (a known row id, a
reviewable field, an allowed value) before anything is written, then merges the labels into
output.dir/gold.parquet, which `pipeline report OUT` scores against when no --gold is given.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
import polars as pl

from ..common import layout, safefs
from ..errors import InputError, UsageError
from . import labelstudio
from .data import RunData, load_run
from .gold import GOLD_SCHEMA, write_gold
from .inputs import input_texts
from .labelstudio import ReviewField

# A row whose request cannot be rebuilt and proved (the input changed since, or the config is gone).
NO_TEXT = "(input not available: the row changed since it was answered, or the job's config cannot be rebuilt)"


@dataclass
class Exported:
    tasks: Path
    csv: Path
    config: Path
    below: int                  # rows under the threshold
    sampled: int                # rows of the random sample
    fields: list[str]


@dataclass
class Imported:
    gold: Path
    labels: int                 # labels stored by this import
    rows: int                   # rows they cover
    by_field: dict[str, int]
    unannotated: int            # tasks / lines without a label
    ignored_fields: list[str] = field(default_factory=list)
    total: int = 0              # labels in gold.parquet after the import


def review_fields(run: RunData) -> list[ReviewField]:
    """Top-level enum and boolean output fields, with their allowed values from the job's schema."""
    out = run.outputs()
    props = (run.schema or {}).get("properties") or {}
    fields = []
    for name in out.columns:
        spec: dict[str, Any] = props[name] if isinstance(props.get(name), dict) else {}
        dtype = out.schema[name]
        if dtype == pl.Boolean:
            fields.append(ReviewField(name, ["true", "false"]))
        elif isinstance(dtype, (pl.Categorical, pl.Enum)) or isinstance(spec.get("enum"), list):
            allowed = [str(v) for v in spec.get("enum") or [] if v is not None]
            seen = out.get_column(name).drop_nulls().cast(pl.String).unique().sort().to_list()
            fields.append(ReviewField(name, allowed or seen))
    return fields


def export_tasks(out_dir: str, dest: str, *, below: float | None, sample: int, seed: int = 0) -> Exported:
    if below is None and sample <= 0:
        raise UsageError("choose the rows to review: --below CONFIDENCE (the uncertain ones), --sample N "
                         "(a random audit sample), or both")
    if sample < 0:
        raise UsageError(f"--sample {sample}: give a number of rows (0 or more)")
    if below is not None and not 0.0 < below <= 1.0:
        raise UsageError(f"--below {below}: give a confidence between 0 and 1 (e.g. 0.8)")
    paths = _paths(Path(dest))
    run = load_run(out_dir)
    fields = review_fields(run)
    if not fields:
        raise UsageError(f"{run.path}: the job has no enum or boolean output field to review (a structured.schema "
                         "with enum or boolean properties gives one)")
    rows = _candidates(run, fields)
    chosen = _choose(rows, run.path, below, sample, seed)
    texts = input_texts(run, set(chosen.get_column("row_id").to_list()))
    records = [{**r, labelstudio.TEXT: texts.get(r["row_id"], NO_TEXT)} for r in chosen.iter_rows(named=True)]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    tasks = [labelstudio.task(r, fields, str(r.get("model") or run.model)) for r in records]
    safefs.write_atomic(paths[0], orjson.dumps(tasks, option=orjson.OPT_INDENT_2))
    safefs.write_atomic(paths[1], labelstudio.csv_text(records, fields).encode("utf-8"))
    safefs.write_atomic(paths[2], labelstudio.label_config(fields).encode("utf-8"))
    n_below = int((chosen.get_column("reason") != "random sample").sum())
    return Exported(*paths, below=n_below, sampled=chosen.height - n_below, fields=[f.name for f in fields])


def _paths(dest: Path) -> tuple[Path, Path, Path]:
    """The three files' paths, checked before any work (their folder is made when writing)."""
    if dest.suffix.lower() != ".json":
        raise UsageError(f"-o {dest}: name the tasks file *.json (the CSV and the labeling config go beside it)")
    if dest.is_dir():
        raise UsageError(f"-o {dest}: that is a folder; give a file name ending in .json")
    existing = next(p for p in dest.parents if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"-o {dest}: {existing} is a file, not a folder; give -o a path in a folder")
    return dest, dest.with_suffix(".csv"), dest.with_name(dest.stem + ".label_config.xml")


def _candidates(run: RunData, fields: list[ReviewField]) -> pl.DataFrame:
    res = run.results
    if res.height == 0:
        raise UsageError(f"{run.path} has no answered rows yet (results.parquet is empty or missing)")
    out = run.outputs()
    conf = res.get_column("confidence").cast(pl.Float64) if "confidence" in res.columns else \
        pl.Series("confidence", [None] * res.height, dtype=pl.Float64)
    cols = [res.get_column(run.id_column).cast(pl.String).alias("row_id"), conf.alias("confidence")]
    if "model" in res.columns:
        cols.append(res.get_column("model").cast(pl.String))
    frame = pl.DataFrame(cols)
    return frame.with_columns([out.get_column(f.name).cast(pl.String).str.to_lowercase().alias(f.name)
                               if out.schema[f.name] == pl.Boolean else out.get_column(f.name).cast(pl.String)
                               for f in fields])


def _choose(rows: pl.DataFrame, path: Path, below: float | None, sample: int, seed: int) -> pl.DataFrame:
    low = rows.head(0).with_columns(reason=pl.lit("", pl.String), weight=pl.lit(1.0))
    if below is not None:
        if rows.get_column("confidence").null_count() == rows.height:
            raise UsageError(f"{path}/results.parquet has no confidences (the job ran without quality.confidence); "
                             "use --sample N alone, or set quality.confidence: logprobs (or votes) and run again")
        low = (rows.filter(pl.col("confidence") < below).sort("confidence", "row_id")
               .with_columns(reason=pl.format("confidence {} < {}", pl.col("confidence").round(3), pl.lit(below)),
                             weight=pl.lit(1.0)))
    rest = rows.join(low.select("row_id"), on="row_id", how="anti").sort("row_id")
    picked = rest.sample(n=min(sample, rest.height), seed=seed, shuffle=True) if sample > 0 and rest.height \
        else rest.head(0)
    # Every uncertain row is up for review, one in (rest / sample) of the others: that inverse is its weight.
    weight = rest.height / picked.height if picked.height else 1.0
    return pl.concat([low, picked.with_columns(reason=pl.lit("random sample"), weight=pl.lit(weight))],
                     how="vertical")


def import_labels(out_dir: str, source: str) -> Imported:
    run = load_run(out_dir)
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{path} is not a file: give Label Studio's export (JSON, JSON-MIN or CSV) or the filled-in "
                         "CSV that `pipeline review export` wrote")
    labels, units = labelstudio.parse(path.read_bytes(), str(path))
    fields = {f.name: f for f in review_fields(run)}
    known = set(run.results.get_column(run.id_column).cast(pl.String).to_list()) if run.results.height else set()
    kept, ignored = [], sorted({lab.field for lab in labels if lab.field not in fields})
    for lab in labels:
        if lab.field not in fields:
            continue
        value = lab.value.lower() if fields[lab.field].choices == ["true", "false"] else lab.value
        if value not in fields[lab.field].choices:
            raise InputError(f"{lab.where}: {lab.field} = {lab.value!r} is not one of "
                             f"{', '.join(fields[lab.field].choices)}; fix the label (or the labeling config) "
                             "and export again", file=str(path))
        if lab.row_id not in known:
            raise InputError(f"{lab.where}: row_id {lab.row_id!r} is not an answered row of {run.path}; were these "
                             "tasks exported from another job?", file=str(path))
        kept.append((lab, value))
    if not kept:
        hint = f" (ignored fields: {', '.join(ignored)}; reviewable: {', '.join(fields)})" if ignored else ""
        raise InputError(f"no label for a reviewable field of the job in it{hint}; annotate some tasks first",
                         file=str(path))
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    frame = pl.DataFrame([{"row_id": lab.row_id, "field": lab.field, "value": value, "annotator": lab.annotator,
                           "annotated_at": lab.annotated_at, "reason": lab.reason, "weight": lab.weight,
                           "source": path.name,
                           "imported_at": now} for lab, value in kept], schema=GOLD_SCHEMA)
    frame = frame.unique(subset=["row_id", "field"], keep="last", maintain_order=True)
    merged = write_gold(run.path, frame)
    by_field = {str(k): int(v) for k, v in frame.group_by("field").len().sort("field").iter_rows()}
    rows = frame.get_column("row_id").n_unique()
    return Imported(run.path / layout.GOLD, frame.height, rows, by_field, max(units - rows, 0), ignored,
                    merged.height)


def print_exported(e: Exported, out: TextIO | None = None) -> int:
    w = (out or sys.stderr).write
    w(f"{e.below + e.sampled:,} tasks: {e.below:,} below the threshold, {e.sampled:,} from the random sample; "
      f"fields {', '.join(e.fields)}\n")
    w(f"wrote {e.tasks} (Label Studio import), {e.csv} (to fill in by hand), {e.config} (the labeling config)\n")
    w("then: pipeline review import OUT_DIR <Label Studio's export, or the CSV filled in>\n")
    return 0


def print_imported(i: Imported, out: TextIO | None = None) -> int:
    w = (out or sys.stderr).write
    per = ", ".join(f"{k}: {v:,}" for k, v in i.by_field.items())
    w(f"stored {i.labels:,} labels ({per}) for {i.rows:,} rows in {i.gold} ({i.total:,} in all)\n")
    if i.ignored_fields:
        w(f"ignored: {', '.join(i.ignored_fields)} (not an enum or boolean output field of the job)\n")
    if i.unannotated:
        w(f"{i.unannotated:,} tasks had no label (not annotated, or cancelled)\n")
    w("`pipeline report OUT_DIR` now scores the runs against them\n")
    return 0
