"""Several output folders over the same input, or one against gold: per-field agreement, confusion
matrices, scores and calibration against gold, the runs side by side, and the rows worth reading.

Rows are matched by the job's id column; a pairwise comparison covers the rows both runs answered (the
`rows` column says how many). Agreement is the share of equal values; Cohen's kappa corrects it for
chance on enum and boolean fields (kappa = (p_o - p_e) / (1 - p_e), null where p_e = 1); numbers get the
mean absolute difference; lists compare as sets. Gold scores count only rows that have a gold value and
an answer: accuracy, and per class precision, recall and F1 (null where a denominator is 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import polars as pl

from ..errors import UsageError
from . import examples, slices
from .calibration import Calibration, calibrate
from .data import RunData
from .gold import Gold, column_gold, stored_gold
from .inputs import input_texts

COMPARABLE = ("enum", "boolean", "number", "text", "list")


@dataclass
class Comparison:
    labels: list[str]                             # how each run is named, in folder order
    agreement: pl.DataFrame                       # field, kind, run_a, run_b, rows, agree, kappa, mean_abs_diff
    confusion: dict[str, pl.DataFrame] = field(default_factory=dict)   # "field: a vs b" -> a, b, count
    cost: pl.DataFrame = field(default_factory=pl.DataFrame)           # one row per run
    gold: pl.DataFrame | None = None              # run, field, rows, accuracy, macro_f1
    gold_classes: pl.DataFrame | None = None      # run, field, class, precision, recall, f1, support
    gold_field: str | None = None                 # the field the first gold column scores
    gold_source: str | None = None
    gold_confusion: dict[str, pl.DataFrame] = field(default_factory=dict)   # "field: run" -> gold, answer, count
    calibration: list[Calibration] = field(default_factory=list)
    label_fields: list[str] = field(default_factory=list)   # enum / boolean fields: the labels read side by side
    disagreements: pl.DataFrame = field(default_factory=pl.DataFrame)
    samples: pl.DataFrame = field(default_factory=pl.DataFrame)
    slices: pl.DataFrame = field(default_factory=pl.DataFrame)   # slices.py: per value of --by, N beside each figure
    slice_notes: list[str] = field(default_factory=list)         # how to read them (weighted gold, audit sample)
    by: str | None = None
    texts: dict[str, str] = field(default_factory=dict)       # row id -> input text, for the rows shown

    def tables(self) -> dict[str, pl.DataFrame]:
        out = {"agreement": self.agreement, "cost": self.cost}
        if self.gold is not None and self.gold_classes is not None:
            out.update(gold=self.gold, gold_classes=self.gold_classes)
        for cal in self.calibration:
            out[f"calibration {cal.field}: {cal.run}"] = cal.thresholds
            out[f"reliability {cal.field}: {cal.run}"] = cal.bins
        if self.slices.height:
            out["slices"] = self.slices
        out.update({f"confusion {name}": df for name, df in self.confusion.items()})
        out.update({f"gold confusion {name}": df for name, df in self.gold_confusion.items()})
        return out


def kind_of(dtype: pl.DataType) -> str:
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "enum"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_numeric():
        return "number"
    if dtype == pl.String:
        return "text"
    if isinstance(dtype, pl.List) and not isinstance(dtype.inner, (pl.Struct, pl.List)):
        return "list"
    return "other"


def compare(runs: list[RunData], gold: str | None = None, *, by: str | None = None,
            target_precision: float | None = None) -> Comparison:
    """Everything the comparison shows. `gold`: COLUMN[=FIELD] of a carried input column; without it the
    human labels stored by `pipeline review import` are used when a folder has them."""
    labels = _labels(runs)
    frames = [_keyed(run) for run in runs]
    fields = _common_fields(frames)
    agreement_rows, confusion = [], {}
    for (i, a), (j, b) in combinations(enumerate(frames), 2):
        joined = a.join(b, on="__id", how="inner", suffix="__b")
        for name, kind in fields:
            x, y = joined.get_column(name), joined.get_column(f"{name}__b")
            agreement_rows.append({"field": name, "kind": kind, "run_a": labels[i], "run_b": labels[j],
                                   **pair_agreement(x, y, kind)})
            if kind == "enum":
                confusion[f"{name}: {labels[i]} vs {labels[j]}"] = confusion_matrix(x, y, "a", "b")
    agreement = pl.DataFrame(agreement_rows, schema={
        "field": pl.String, "kind": pl.String, "run_a": pl.String, "run_b": pl.String, "rows": pl.Int64,
        "agree": pl.Float64, "kappa": pl.Float64, "mean_abs_diff": pl.Float64})
    result = Comparison(labels, agreement, confusion, by=by)
    result.label_fields = [n for n, k in fields if k in ("enum", "boolean")]
    gold_set = column_gold(runs, gold) if gold else stored_gold(runs)
    if gold_set is not None:
        _score(result, runs, gold_set, target_precision)
    scores = result.gold.filter(pl.col("field") == result.gold_field) if result.gold is not None else None
    result.cost = _cost_table(runs, labels, agreement, scores)
    _rows_to_read(result, runs, gold_set)
    return result


def pair_agreement(x: pl.Series, y: pl.Series, kind: str) -> dict[str, float | int | None]:
    """Share equal, kappa (enum, boolean) and mean absolute difference (number) over rows both answered."""
    if kind == "list":
        x, y = x.list.sort().cast(pl.List(pl.String)), y.list.sort().cast(pl.List(pl.String))
    elif kind in ("enum", "boolean"):
        x, y = x.cast(pl.String), y.cast(pl.String)
    both = pl.DataFrame({"x": x, "y": y}).drop_nulls()
    n = both.height
    out: dict[str, float | int | None] = {"rows": n, "agree": None, "kappa": None, "mean_abs_diff": None}
    if n == 0:
        return out
    out["agree"] = float((both.get_column("x") == both.get_column("y")).mean())  # type: ignore[arg-type]
    if kind in ("enum", "boolean"):
        out["kappa"] = cohen_kappa(both.get_column("x"), both.get_column("y"))
    if kind == "number":
        out["mean_abs_diff"] = float((both.get_column("x").cast(pl.Float64)
                                      - both.get_column("y").cast(pl.Float64)).abs().mean())  # type: ignore[arg-type]
    return out


def cohen_kappa(x: pl.Series, y: pl.Series) -> float | None:
    n = x.len()
    p_o = float((x == y).sum()) / n
    px = x.value_counts(name="nx").rename({x.name: "v"})
    py = y.value_counts(name="ny").rename({y.name: "v"})
    p_e = float(px.join(py, on="v", how="inner").select((pl.col("nx") * pl.col("ny")).sum()).item()) / (n * n)
    return None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def confusion_matrix(x: pl.Series, y: pl.Series, x_name: str, y_name: str) -> pl.DataFrame:
    """Counts for every (x, y) label pair, zeros included, so the matrix is complete."""
    both = pl.DataFrame({x_name: x.cast(pl.String), y_name: y.cast(pl.String)}).drop_nulls()
    labels = sorted(set(both.get_column(x_name).to_list()) | set(both.get_column(y_name).to_list()))
    grid = pl.DataFrame({x_name: labels}).join(pl.DataFrame({y_name: labels}), how="cross")
    counts = both.group_by(x_name, y_name).len(name="count")
    return (grid.join(counts, on=[x_name, y_name], how="left")
            .with_columns(pl.col("count").fill_null(0).cast(pl.Int64)).sort(x_name, y_name))


def _score(result: Comparison, runs: list[RunData], gold: Gold, target: float | None) -> None:
    result.gold_source = gold.source
    scored = [f for f in gold.fields if any(f in run.outputs().columns for run in runs)]
    if not scored:
        raise UsageError(f"the gold labels ({gold.source}) name the field(s) {', '.join(gold.fields)}, none of "
                         "which is an output field of these runs")
    result.gold_field = scored[0]
    summary, classes = [], []
    for run, label in zip(runs, result.labels):
        out = run.outputs()
        if out.width == 0:
            continue
        keyed = out.with_columns(run.results.get_column(run.id_column).cast(pl.String).alias("__id"))
        conf = _confidences(run)
        for name in scored:
            if name not in keyed.columns:
                continue
            both = gold.column(name).join(keyed.select("__id", pl.col(name).cast(pl.String).alias("pred")),
                                          on="__id", how="inner")
            s, c = gold_scores(both.get_column("gold"), both.get_column("pred"), label, name, both.get_column("weight"))
            summary.append(s)
            classes += c
            result.gold_confusion[f"{name}: {label}"] = confusion_matrix(
                both.get_column("gold"), both.get_column("pred").fill_null("(no answer)"), "gold", "answer")
            if conf is not None:
                result.calibration.append(_calibrate(label, name, conf, both, keyed, target))
    result.gold = pl.DataFrame(summary, schema={"run": pl.String, "field": pl.String, "rows": pl.Int64,
                                                "accuracy": pl.Float64, "macro_f1": pl.Float64})
    result.gold_classes = pl.DataFrame(classes, schema={
        "run": pl.String, "field": pl.String, "class": pl.String, "precision": pl.Float64, "recall": pl.Float64,
        "f1": pl.Float64, "support": pl.Int64})


def _confidences(run: RunData) -> pl.DataFrame | None:
    """__id, `confidence` and one `conf:<field>` column per field of confidence_by_field (None without any)."""
    res = run.results
    if "confidence" not in res.columns or res.get_column("confidence").null_count() == res.height:
        return None
    cols = [res.get_column(run.id_column).cast(pl.String).alias("__id"),
            res.get_column("confidence").cast(pl.Float64)]
    by_field = res.schema.get("confidence_by_field")
    if isinstance(by_field, pl.Struct):
        cols += [res.get_column("confidence_by_field").struct.field(f.name).cast(pl.Float64).alias(f"conf:{f.name}")
                 for f in by_field.fields]
    return pl.DataFrame(cols)


def _calibrate(label: str, name: str, conf: pl.DataFrame, both: pl.DataFrame, keyed: pl.DataFrame,
               target: float | None) -> Calibration:
    column = f"conf:{name}" if f"conf:{name}" in conf.columns else "confidence"
    source = f"confidence_by_field.{name}" if column != "confidence" else "confidence"
    scored = both.join(conf.select("__id", pl.col(column).alias("conf")), on="__id", how="left").select(
        "conf", "weight", correct=(pl.col("pred") == pl.col("gold")).fill_null(False))
    population = keyed.select("__id").join(conf.select("__id", pl.col(column).alias("c")), on="__id").get_column("c")
    return calibrate(label, name, source, population, scored, target)


def gold_scores(gold: pl.Series, pred: pl.Series, label: str, name: str, weight: pl.Series | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy and per-class precision / recall / F1 of one run's answers to one field; with weights
    (review gold: a row's inverse chance of being reviewed) the counts are sums of weights, so the figures
    estimate the whole job. `support` stays a count of gold rows."""
    pred_ok = pred.fill_null("(no answer)")
    n = gold.len()
    w = weight.cast(pl.Float64).fill_null(1.0) if weight is not None else pl.Series([1.0] * n, dtype=pl.Float64)
    scores = []
    for cls in sorted(set(gold.to_list()) | set(pred.drop_nulls().to_list())):
        said, true = pred_ok == cls, gold == cls
        tp, fp, fn = (float(w.filter(m).sum()) for m in (said & true, said & ~true, ~said & true))
        p = tp / (tp + fp) if tp + fp else None
        r = tp / (tp + fn) if tp + fn else None
        scores.append({"run": label, "field": name, "class": cls, "precision": p, "recall": r, "f1": _f1(p, r),
                       "support": int(true.sum())})
    f1s = [s["f1"] for s in scores if s["support"] and s["f1"] is not None]
    total = float(w.sum())
    summary = {"run": label, "field": name, "rows": n,
               "accuracy": float(w.filter(pred_ok == gold).sum()) / total if n and total > 0 else None,
               "macro_f1": sum(f1s) / len(f1s) if f1s else None}
    return summary, scores


def _rows_to_read(result: Comparison, runs: list[RunData], gold: Gold | None) -> None:
    fields = result.label_fields or ([result.gold_field] if result.gold_field else [])
    sliced = result.gold_field or (fields[0] if fields else None)
    frame = examples.wide(runs, fields, gold, result.by, sliced)
    result.disagreements = examples.disagreements(frame, fields, len(runs))
    result.samples = examples.samples(frame)
    result.slices = slices.slices(frame, result.labels, sliced)
    result.slice_notes = slices.notes(frame, sliced) if result.slices.height else []
    ids = set(result.disagreements.get_column("__id").to_list()) | set(result.samples.get_column("__id").to_list())
    for run in runs:  # the runs share an input; another run's config may still render what one cannot
        missing = ids - set(result.texts)
        if not missing:
            break
        result.texts.update(input_texts(run, missing))


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def _keyed(run: RunData) -> pl.DataFrame:
    if not run.results.height:
        return pl.DataFrame({"__id": []}, schema={"__id": pl.String})
    ids = run.results.get_column(run.id_column).cast(pl.String).alias("__id")
    out = run.outputs()
    return out.with_columns(ids) if out.width else pl.DataFrame({"__id": ids})


def _common_fields(frames: list[pl.DataFrame]) -> list[tuple[str, str]]:
    first = frames[0]
    out = []
    for name in first.columns:
        if name == "__id":
            continue
        kind = kind_of(first.schema[name])
        if kind in COMPARABLE and all(name in f.columns and kind_of(f.schema[name]) == kind for f in frames[1:]):
            out.append((name, kind))
    return out


def _labels(runs: list[RunData]) -> list[str]:
    models = [r.model for r in runs]
    return [r.model if models.count(r.model) == 1 else r.label for r in runs]


def _cost_table(runs: list[RunData], labels: list[str], agreement: pl.DataFrame, gold: pl.DataFrame | None
                ) -> pl.DataFrame:
    """Per run: what it cost and how well it agrees with the first run (the reference) and the gold."""
    from .figures import run_figures

    rows = []
    ref = labels[0]
    for run, label in zip(runs, labels):
        fig = run_figures(run)
        vs_ref = agreement.filter((pl.col("run_a") == ref) & (pl.col("run_b") == label)
                                  & pl.col("kind").is_in(["enum", "boolean"]))
        acc = gold.filter(pl.col("run") == label).get_column("accuracy").first() if gold is not None else None
        rows.append({"run": label, "out_dir": str(run.path), "rows": fig["succeeded"], "cost_usd": fig["cost_usd"],
                     "cost_per_1k_rows": fig["cost_per_1k_rows"],
                     "agreement_with_reference": 1.0 if label == ref
                     else (vs_ref.get_column("agree").mean() if vs_ref.height else None),
                     "gold_accuracy": acc})
    return pl.DataFrame(rows, schema={"run": pl.String, "out_dir": pl.String, "rows": pl.Int64, "cost_usd": pl.Float64,
                                      "cost_per_1k_rows": pl.Float64, "agreement_with_reference": pl.Float64,
                                      "gold_accuracy": pl.Float64})
