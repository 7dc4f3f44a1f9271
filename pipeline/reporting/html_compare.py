"""The comparison, first in the report: the runs side by side, where they disagree, how each does
against gold (scores, confusion matrices, calibration), slices by a carried column, sample rows, and the
per-field agreement between runs.

Tables with text (input, answers) wrap inside the page width; charts carry their titles in HTML, so a
long run name wraps instead of being clipped by the SVG.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from . import charts
from .calibration import MIN_GOLD_ROWS, Calibration
from .compare import Comparison
from .data import RunData
from .figures import run_figures
from .markup import cell, e, figure, fmt, money, pct, table

TEXT_CHARS = 400
_SHARES = ("accepted_share", "precision", "precision_low", "precision_high")


def comparison_section(c: Comparison, runs: list[RunData]) -> str:
    several = len(runs) > 1
    out = [f"<h2 id=\"compare\">{'Comparison' if several else 'Against gold'}</h2>",
           "<p class=\"sub\">Rows matched by id; the first folder is the reference."
           + (f" Gold: {e(c.gold_source)}." if c.gold_source else " No gold: give --gold COLUMN, or import human "
              "labels with <code>pipeline review import</code>.") + "</p>"]
    out.append(_side_by_side(c, runs))
    if c.disagreements.height:
        out.append(_rows_table(c, c.disagreements, "Where the runs disagree" if several else "Where the answer "
                               "differs from gold", "cmp.disagree"))
    if c.gold is not None:
        out.append(_gold(c))
    if c.calibration:
        out.append(_calibration(c.calibration))
    if c.slices.height:
        out.append(_slices(c))
    if c.samples.height:
        out.append(_rows_table(c, c.samples, "Sample rows", "cmp.sample"))
    if several:
        out.append(_agreement(c))
    return "".join(out)


def _side_by_side(c: Comparison, runs: list[RunData]) -> str:
    """One column per run, one row per figure."""
    figures = [run_figures(r) for r in runs]
    gold = {row["run"]: row for row in c.gold.filter(pl.col("field") == c.gold_field).iter_rows(named=True)} \
        if c.gold is not None else {}
    cost = {row["run"]: row for row in c.cost.iter_rows(named=True)}
    cal = {x.run: x for x in c.calibration if x.field == c.gold_field}
    rows: list[tuple[str, str, Any, Any]] = []   # (key, what, value, text)
    for _i, (run, f, label) in enumerate(zip(runs, figures, c.labels)):
        conf = run.results.get_column("confidence").mean() if "confidence" in run.results.columns and \
            run.results.height else None
        g, k = gold.get(label, {}), cal.get(label)
        rows += [
            ("folder", "output folder", str(run.path), None), ("model", "model", _models(run), None),
            ("succeeded", "rows answered", f["succeeded"], None), ("failed", "rows failed", f["failed"], None),
            ("accuracy", f"accuracy against gold ({c.gold_field})" if c.gold_field else "accuracy against gold",
             g.get("accuracy"), pct(g.get("accuracy"))),
            ("macro_f1", "macro F1", g.get("macro_f1"),
             fmt(g.get("macro_f1"), ".3f") if g.get("macro_f1") is not None else None),
            ("agreement", "agreement with the first run (labels)", cost.get(label, {}).get("agreement_with_reference"),
             pct(cost.get(label, {}).get("agreement_with_reference"))),
            ("mean_confidence", "mean confidence", conf, fmt(conf, ".3f") if conf is not None else None),
            ("ece", "calibration error (ECE)", k.ece if k else None,
             fmt(k.ece, ".3f") if k and k.ece is not None else None),
            ("cost_usd", "cost (whole job)", f["cost_usd"], money(f["cost_usd"])),
            ("cost_per_1k_rows", "cost per 1,000 rows", f["cost_per_1k_rows"], money(f["cost_per_1k_rows"])),
        ]
    per_run = len(rows) // max(len(runs), 1)
    head = "<th></th>" + "".join(f"<th>{e(label)}</th>" for label in c.labels)
    body = []
    for r in range(per_run):
        key, what = rows[r][0], rows[r][1]
        cells = [cell(f"cmp.runs.{c.labels[i]}.{key}", rows[i * per_run + r][2], rows[i * per_run + r][3],
                      cls="n" if isinstance(rows[i * per_run + r][2], (int, float)) else "t")
                 for i in range(len(runs))]
        body.append(f"<tr><th>{e(what)}</th>{''.join(cells)}</tr>")
    scatter = ""
    y = "gold_accuracy" if c.gold is not None else "agreement_with_reference"
    plot = c.cost.filter(pl.col(y).is_not_null())
    if len(runs) > 1 and plot.height:
        scatter = figure(charts.scatter(plot, "cost_usd", y, "run"), "",
                         title=f"Cost against {y.replace('_', ' ')}")
    return (f"<h3 id=\"runs\">Runs side by side</h3><div class=\"grid\"><table class=\"side\"><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>{scatter}</div>")


def _models(run: RunData) -> str:
    if "model" in run.results.columns and run.results.height:
        served = run.results.get_column("model").drop_nulls().unique().sort().to_list()
        if served:
            return ", ".join(str(m) for m in served)
    return run.model


def _rows_table(c: Comparison, rows: pl.DataFrame, title: str, key: str) -> str:
    """id, input text, each run's answers (every label field), gold."""
    fields = c.label_fields or ([c.gold_field] if c.gold_field else [])
    head = ["id", "input"] + [e(label) for label in c.labels]
    golds = [f for f in fields if f"gold:{f}" in rows.columns]
    if golds:
        head.append("gold")
    body = []
    for r in rows.iter_rows(named=True):
        rid = r["__id"]
        text = c.texts.get(rid)
        cells = [cell(f"{key}.{rid}.id", rid), cell(f"{key}.{rid}.input", text,
                                                     _clip(text) if text else "(input not available)", cls="t")]
        for i, label in enumerate(c.labels):
            answer = {f: r.get(f"{f}@{i}") for f in fields}
            conf = r.get(f"confidence@{i}")
            shown = _answer(answer, r, golds) + (f" · {conf:.2f}" if conf is not None else "")
            cells.append(cell(f"{key}.{rid}.{label}", _raw_answer(answer), shown, cls="t"))
        if golds:
            g = {f: r.get(f"gold:{f}") for f in golds}
            cells.append(cell(f"{key}.{rid}.gold", _raw_answer(g), _answer(g, r, []), cls="t"))
        body.append(f"<tr>{''.join(cells)}</tr>")
    ths = "".join(f"<th>{h}</th>" for h in head)
    conf_note = " The number after an answer is the row's confidence." if any(
        c.startswith("confidence@") for c in rows.columns) else ""
    return (f"<h3 id=\"{key.split('.')[-1]}\">{e(title)}</h3><p class=\"muted\">Answers as field: value; "
            f"a field that differs from gold is marked ✗.{conf_note}</p>"
            f"<table class=\"rows\"><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _answer(answer: dict[str, Any], row: dict[str, Any], golds: list[str]) -> str:
    parts = []
    for f, v in answer.items():
        wrong = f in golds and v is not None and row.get(f"gold:{f}") not in (None, v)
        parts.append(f"{f}: {fmt(v)}{' ✗' if wrong else ''}" if len(answer) > 1 else f"{fmt(v)}{' ✗' if wrong else ''}")
    return "; ".join(parts)


def _raw_answer(answer: dict[str, Any]) -> str:
    return "; ".join(f"{f}={'' if v is None else v}" for f, v in answer.items())


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"


def _gold(c: Comparison) -> str:
    assert c.gold is not None and c.gold_classes is not None
    out = [f"<h3 id=\"gold\">Against gold ({e(c.gold_source)})</h3>", table(c.gold, key="cmp.gold", key_column="run"),
           "<div class=\"grid\">"]
    for name, df in c.gold_confusion.items():
        field, _, run = name.partition(": ")
        out.append(figure(charts.heatmap(df, "gold", "answer", f"gold {field}", f"{run}"), "rows: gold; columns: "
                          "the run's answer", title=f"{field}: {run} against gold", key=f"cmp.gold_confusion.{name}"))
    out.append("</div><details><summary>per class: precision, recall, F1</summary>")
    out.append(table(c.gold_classes, key="cmp.gold_classes") + "</details>")
    return "".join(out)


def _calibration(cals: list[Calibration]) -> str:
    out = ["<h3 id=\"calibration\">Calibration: can the confidence decide what skips review?</h3>",
           "<p class=\"muted\">Rows at or above a threshold are auto-accepted. Accepted share: of every answered "
           "row; precision: of the gold rows accepted (95% Wilson interval). ECE: the rows-weighted gap between "
           "confidence and accuracy over 10 bins.</p>"]
    for cal in cals:
        k = f"cmp.calibration.{cal.run}.{cal.field}"
        chosen = ""
        if cal.target is not None:
            if cal.chosen:
                ch = cal.chosen
                chosen = (f"<p>For precision ≥ {cal.target:g}: use threshold <b data-k=\"{e(k)}.chosen\" "
                          f"data-v=\"{e(ch['threshold'])}\">{ch['threshold']:.3f}</b>: it auto-accepts "
                          f"{pct(ch['accepted_share'])} of the rows at a measured precision of {pct(ch['precision'])} "
                          f"({ch['gold_rows']:,} gold rows, 95% interval {pct(ch['precision_low'])} – "
                          f"{pct(ch['precision_high'])}).</p>")
            else:
                chosen = (f"<p class=\"warn\" data-k=\"{e(k)}.chosen\" data-v=\"\">No threshold reaches a precision of "
                          f"{cal.target:g} on at least {MIN_GOLD_ROWS} gold rows: review more rows (more gold), "
                          "or send the uncertain ones to a stronger model.</p>")
        svg = charts.reliability(cal.bins)
        cap = (f"ECE {fmt(cal.ece, '.3f') if cal.ece is not None else '–'} over {cal.rows:,} gold rows "
               f"({cal.confidence}); {cal.no_confidence:,} without a confidence left out.")
        thresholds = cal.thresholds.select(
            "threshold", "accepted_share", "accepted_rows", "gold_rows", "precision", "precision_low", "precision_high")
        out.append(f"<h4>{e(cal.field)}: {e(cal.run)}</h4>{chosen}<div class=\"grid\">"
                   + figure(svg, cap, title="Reliability: accuracy per confidence bin", key=f"{k}.reliability")
                   + f"<div><span data-k=\"{e(k)}.ece\" "
                     f"data-v=\"{e('' if cal.ece is None else repr(cal.ece))}\"></span>"
                   + table(thresholds, key=f"{k}.thresholds", formats={c: pct for c in _SHARES}) + "</div></div>")
    return "".join(out)


def _slices(c: Comparison) -> str:
    """The slice table with the rows behind each figure, and how to read it."""
    shares: dict[str, Callable[[Any], str]] = {
        col: pct for col in c.slices.columns
        if col == "share" or col.split(" ")[0] in ("accuracy", "agreement") or col.startswith("audit agreement")}
    note = " ".join(["Rows: the slice's rows answered by any run; share: of all of them.", *c.slice_notes])
    return (f"<h3 id=\"slices\">By {e(c.by)}</h3><p class=\"muted\">{e(note)}</p>"
            + table(c.slices, key="cmp.slices", key_column="slice", formats=shares))


def _agreement(c: Comparison) -> str:
    out = ["<h3 id=\"agreement\">Per-field agreement between runs</h3>",
           "<p class=\"muted\">Agreement: share of equal values; kappa: Cohen's kappa (chance-corrected); numbers: "
           "mean absolute difference.</p>", table(c.agreement, key="cmp.agreement")]
    if c.confusion:
        out.append("<div class=\"grid\">")
        for name, df in c.confusion.items():
            field, _, pair = name.partition(": ")
            a, _, b = pair.partition(" vs ")
            out.append(figure(charts.heatmap(df, "a", "b", a, b), f"rows: {a}; columns: {b}",
                              title=f"{field}: {a} against {b}", key=f"cmp.confusion.{name}"))
        out.append("</div>")
    return "".join(out)
