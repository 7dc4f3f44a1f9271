"""Several output folders over the same input: per-field agreement, confusion matrices, cost against
agreement, and scores against a gold column carried from the input.

Rows are matched by the job's id column; a comparison covers the rows every compared run answered (the
`rows` column says how many). Agreement is the share of equal values; Cohen's kappa corrects it for
chance on enum and boolean fields (kappa = (p_o - p_e) / (1 - p_e), null where p_e = 1); numbers get the
mean absolute difference; lists compare as sets. Gold scores count only rows that have a gold value and
an answer: accuracy, and per class precision, recall and F1 (null where a denominator is 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import polars as pl

from ..errors import UsageError
from .data import RunData

COMPARABLE = ("enum", "boolean", "number", "text", "list")


@dataclass
class Comparison:
    agreement: pl.DataFrame                       # field, kind, run_a, run_b, rows, agree, kappa, mean_abs_diff
    confusion: dict[str, pl.DataFrame] = field(default_factory=dict)   # "field: a vs b" -> a, b, count
    cost: pl.DataFrame = field(default_factory=pl.DataFrame)           # one row per run
    gold: pl.DataFrame | None = None              # run, field, rows, accuracy, macro_f1
    gold_classes: pl.DataFrame | None = None      # run, class, precision, recall, f1, support
    gold_field: str | None = None

    def tables(self) -> dict[str, pl.DataFrame]:
        out = {"agreement": self.agreement, "cost": self.cost}
        if self.gold is not None and self.gold_classes is not None:
            out.update(gold=self.gold, gold_classes=self.gold_classes)
        out.update({f"confusion {name}": df for name, df in self.confusion.items()})
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


def compare(runs: list[RunData], gold: str | None = None) -> Comparison:
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
    result = Comparison(agreement, confusion)
    if gold:
        result.gold, result.gold_classes, result.gold_field = gold_scores(runs, labels, gold)
    result.cost = _cost_table(runs, labels, agreement, result.gold)
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


def gold_scores(runs: list[RunData], labels: list[str], spec: str
                ) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """Accuracy and per-class precision / recall / F1 of each run against an input column."""
    column, _, wanted = spec.partition("=")
    summary, classes = [], []
    chosen = wanted or None
    for run, label in zip(runs, labels):
        gold_col = _gold_column(run, column)
        out = run.outputs()
        name = chosen or _gold_field(out, run.results.get_column(gold_col), column)
        chosen = name
        if name not in out.columns:
            raise UsageError(f"--gold {spec}: {run.path} has no output field {name!r}; give COLUMN=FIELD "
                             f"with one of: {', '.join(out.columns)}")
        both = pl.DataFrame({"gold": run.results.get_column(gold_col).cast(pl.String),
                             "pred": out.get_column(name).cast(pl.String)}).drop_nulls("gold")
        pred_ok = both.get_column("pred").fill_null("(no answer)")
        gold_v = both.get_column("gold")
        n = both.height
        scores = []
        for cls in sorted(set(gold_v.to_list()) | set(both.get_column("pred").drop_nulls().to_list())):
            tp = int(((pred_ok == cls) & (gold_v == cls)).sum())
            fp = int(((pred_ok == cls) & (gold_v != cls)).sum())
            fn = int(((pred_ok != cls) & (gold_v == cls)).sum())
            p = tp / (tp + fp) if tp + fp else None
            r = tp / (tp + fn) if tp + fn else None
            scores.append({"run": label, "class": cls, "precision": p, "recall": r, "f1": _f1(p, r),
                           "support": tp + fn})
        classes += scores
        f1s = [s["f1"] for s in scores if s["support"] and s["f1"] is not None]
        summary.append({"run": label, "field": name, "rows": n,
                        "accuracy": float((pred_ok == gold_v).mean()) if n else None,  # type: ignore[arg-type]
                        "macro_f1": sum(f1s) / len(f1s) if f1s else None})
    return (pl.DataFrame(summary, schema={"run": pl.String, "field": pl.String, "rows": pl.Int64,
                                          "accuracy": pl.Float64, "macro_f1": pl.Float64}),
            pl.DataFrame(classes, schema={"run": pl.String, "class": pl.String, "precision": pl.Float64,
                                          "recall": pl.Float64, "f1": pl.Float64, "support": pl.Int64}),
            str(chosen))


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def _gold_column(run: RunData, column: str) -> str:
    for name in (column, f"input.{column}"):
        if name in run.results.columns:
            return name
    raise UsageError(f"--gold {column}: {run.path}/results.parquet has no column {column!r}; carry it from the "
                     f"input with input.columns: [{column}] (and re-run, which sends nothing new)")


def _gold_field(out: pl.DataFrame, gold: pl.Series, column: str) -> str:
    """The output field a gold column scores: the same name, else the enum sharing most of its values."""
    if column in out.columns:
        return column
    values = set(gold.drop_nulls().cast(pl.String).to_list())
    best, overlap = None, 0
    for name in out.columns:
        if kind_of(out.schema[name]) in ("enum", "boolean", "text"):
            shared = len(values & set(out.get_column(name).drop_nulls().cast(pl.String).to_list()))
            if shared > overlap:
                best, overlap = name, shared
    if best is None:
        raise UsageError(f"--gold {column}: no output field shares values with it; name one as {column}=FIELD")
    return best


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
                     "agreement_with_reference": 1.0 if label == ref else (vs_ref.get_column("agree").mean() if vs_ref.height else None),
                     "gold_accuracy": acc})
    return pl.DataFrame(rows, schema={"run": pl.String, "out_dir": pl.String, "rows": pl.Int64, "cost_usd": pl.Float64,
                                      "cost_per_1k_rows": pl.Float64, "agreement_with_reference": pl.Float64,
                                      "gold_accuracy": pl.Float64})
