"""The report as one self-contained HTML document: inline CSS, inline SVG charts, no script, no URL.

Every value that came from the output folder (ids, messages, raw content, labels) is escaped: the folder
is untrusted, and a model's answer may well contain markup or URLs (shown as text, never as links). Figures carry their exact value in a
`data-k` / `data-v` pair so that tools (and the tests) can read them back without parsing formatted text.
"""
from __future__ import annotations

import html
import time
from typing import Any

import polars as pl

from . import charts
from .compare import Comparison
from .data import RunData
from .figures import (
    TAIL_FACTOR,
    failure_figures,
    field_summaries,
    run_figures,
    time_figures,
)

HISTORY_ROWS = 30

CSS = """
.pr{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2330;
 max-width:1180px;margin:0 auto;padding:8px 20px 40px}
.pr h1{font-size:24px;margin:12px 0 4px}.pr h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #dfe5ee}.pr h3{font-size:15px;margin:20px 0 8px;color:#2c3e55}
.pr .sub{color:#667;margin:0 0 14px}.pr nav a{margin-right:14px;color:#3b6ea8;text-decoration:none}
.pr .cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.pr .card{background:#f5f7fa;border:1px solid #e3e8ef;border-radius:8px;padding:8px 14px;min-width:120px}
.pr .card b{display:block;font-size:19px;font-weight:600}.pr .card span{color:#667;font-size:12px}
.pr table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
.pr th,.pr td{border-bottom:1px solid #e6e9ef;padding:4px 10px;text-align:left;vertical-align:top}
.pr th{background:#f5f7fa;font-weight:600}.pr td.n{text-align:right;font-variant-numeric:tabular-nums}
.pr .grid{display:flex;flex-wrap:wrap;gap:18px 26px;align-items:flex-start}
.pr figure{margin:0;border:1px solid #eef1f5;border-radius:8px;padding:8px;background:#fff}
.pr figcaption{font-size:12px;color:#667;margin-top:4px;max-width:460px}
.pr pre{background:#f7f7f9;border:1px solid #e6e6ea;border-radius:6px;padding:6px 8px;white-space:pre-wrap;
 word-break:break-all;max-height:220px;overflow:auto;font-size:12px;margin:4px 0}
.pr .warn{color:#a03a37}.pr .muted{color:#889}.pr details{margin:6px 0}
"""


def document(runs: list[RunData], body: str) -> str:
    """The whole page around a fragment."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>pipeline report: {_e(', '.join(r.path.name for r in runs))}</title></head>"
            f"<body style=\"margin:0;background:#fff\">{body}</body></html>\n")


def fragment(runs: list[RunData], comparison: Comparison | None, *, gold: str | None = None) -> str:
    """The report's body inside one scoped <div> (also what a notebook shows)."""
    parts = [f"<div class=\"pr\"><style>{CSS}</style><h1>pipeline report</h1>",
             f"<p class=\"sub\">{_e(', '.join(str(r.path) for r in runs))} · generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>", _nav(runs, comparison)]
    for i, run in enumerate(runs):
        parts.append(run_sections(run, f"r{i}", multiple=len(runs) > 1))
    if comparison is not None:
        parts.append(comparison_section(comparison, gold))
    parts.append("</div>")
    return "".join(parts)


def _nav(runs: list[RunData], comparison: Comparison | None) -> str:
    links = []
    for i, run in enumerate(runs):
        tag = f" ({_e(run.model)})" if len(runs) > 1 else ""
        links += [f"<a href=\"#r{i}-{s}\">{s.capitalize()}{tag}</a>" for s in ("run", "time", "failures", "outputs")]
    if comparison is not None:
        links.append("<a href=\"#compare\">Comparison</a>")
    return f"<nav>{''.join(links)}</nav>"


def run_sections(run: RunData, p: str, *, multiple: bool) -> str:
    title = f" — {_e(run.label)}" if multiple else f" — {_e(run.model)}"
    return "".join([_run(run, p, title), _time(run, p), _failures(run, p), _outputs(run, p)])


def _run(run: RunData, p: str, title: str) -> str:
    f = run_figures(run)
    cards = [
        _card(f"{p}.succeeded", f["succeeded"], "succeeded"), _card(f"{p}.failed", f["failed"], "failed"),
        _card(f"{p}.pending", f["pending"], "pending"), _card(f"{p}.rows_total", f["rows_total"], "rows in input"),
        _card(f"{p}.cost_usd", f["cost_usd"], "cost (USD, whole job)", f"${f['cost_usd']:,.4f}"),
        _card(f"{p}.cost_per_1k_rows", f["cost_per_1k_rows"], "USD per 1,000 rows", _money(f["cost_per_1k_rows"])),
        _card(f"{p}.prompt_tokens", f["prompt_tokens"], "prompt tokens"),
        _card(f"{p}.completion_tokens", f["completion_tokens"], "completion tokens"),
        _card(f"{p}.cache_hit_share", f["cache_hit_share"], "prompt tokens read from the provider's cache",
              f"{f['cache_hit_share']:.0%}"),
        _card(f"{p}.cache_saved_usd", f["cache_saved_usd"], "saved by the prompt cache (USD)",
              _money(f["cache_saved_usd"])),
        _card(f"{p}.requests_sent", f["requests_sent"], "requests sent (this run)"),
        _card(f"{p}.wall_s", f["wall_s"], "wall time (this run)", _duration(f["wall_s"])),
        _card(f"{p}.rows_per_s", f["rows_per_s"], "rows / s (this run)", _fmt(f["rows_per_s"], ".1f")),
    ]
    outcome = pl.DataFrame({"outcome": ["succeeded", "failed", "pending"],
                            "rows": [f["succeeded"], f["failed"], f["pending"]]})
    figs = [_figure(charts.bars(outcome, "outcome", "rows", "Rows by outcome", sort=False, width=280), "")]
    retries = pl.DataFrame({"class": list(f["retries"]), "retries": list(f["retries"].values())},
                           schema={"class": pl.String, "retries": pl.Int64})
    if retries.height:
        figs.append(_figure(charts.bars(retries.sort("retries", descending=True), "class", "retries",
                                        "Retries by class", color=charts.WARN, width=280), ""))
    extra = _kv(p, {"retries": f["retries"], "cache_hits": f["cache_hits"], "deduplicated": f["deduplicated"],
                    "exit_code": f["exit_code"], "stopped": f["stopped"], "structured_mode": f["structured_mode"],
                    "run_cost_usd": f["run_cost_usd"]})
    stop = f"<p class=\"warn\">stopped: {_e(f['stop_message'] or f['stopped'])}</p>" if f["stopped"] else ""
    missing = "" if run.summary else "<p class=\"warn\">no summary.json: the figures come from the outputs</p>"
    return (f"<h2 id=\"{p}-run\">Run{title}</h2>{missing}{stop}<div class=\"cards\">{''.join(cards)}</div>"
            f"<div class=\"grid\">{''.join(figs)}{extra}</div>{_history(run, p)}")


def _history(run: RunData, p: str) -> str:
    if not run.history:
        return "<p class=\"muted\">No run history (history.jsonl) in this folder.</p>"
    cols = ["run_id", "started_at", "finished_at", "exit_code", "rows_new", "rows_reused", "rows_removed",
            "succeeded", "failed", "pending", "requests", "retries", "cost_usd", "stop_reason", "message"]
    shown = run.history[-HISTORY_ROWS:]
    rows = [{c: _fmt_history(h.get(c)) for c in cols} for h in shown]
    df = pl.DataFrame(rows, schema={c: pl.String for c in cols})
    earlier = len(run.history) - len(shown)
    note = f"<p class=\"muted\">{earlier:,} earlier runs not shown.</p>" if earlier else ""
    return f"<h3>Run history (history.jsonl)</h3>{note}{table(df, key=f'{p}.history')}"


def _fmt_history(v: Any) -> str | None:
    if isinstance(v, dict):
        return ", ".join(f"{a}={b}" for a, b in sorted(v.items(), key=str)) or None
    return None if v is None else str(v)


def _time(run: RunData, p: str) -> str:
    t = time_figures(run)
    head = f"<h2 id=\"{p}-time\">Time</h2>"
    if t.requests == 0:
        return head + "<p class=\"muted\">No stored responses with times (store.sqlite absent or empty).</p>"
    lat = {k: v for k, v in t.latency.items() if k != "mean"}
    cards = [_card(f"{p}.latency.{k}", v, f"latency {k}", _secs(v)) for k, v in t.latency.items()]
    cards.append(_card(f"{p}.timed_requests", t.requests, "stored answers timed"))
    cards.append(_card(f"{p}.rate_pauses", len(t.pauses), "429 pauses (pipeline.log)"))
    pauses = "" if t.pauses or any(run.events) else " No pipeline.log in this folder, so 429 pauses are not shown."
    figs = [
        _figure(charts.throughput(t.throughput, t.pauses, "Answers stored per second"),
                f"Over {t.scope}, from each answer's commit time; shaded: 429 pauses." + pauses),
        _figure(charts.histogram(t.latency_hist, "Latency of answered requests", "seconds", marks=lat),
                "Per request (the last attempt's latency), with p50 / p90 / p99; the last bar also holds "
                f"every request slower than {TAIL_FACTOR:g} x p99."),
    ]
    return f"{head}<div class=\"cards\">{''.join(cards)}</div><div class=\"grid\">{''.join(figs)}</div>"


def _failures(run: RunData, p: str) -> str:
    by, examples = failure_figures(run)
    head = f"<h2 id=\"{p}-failures\">Failures</h2>"
    if by.height == 0:
        return head + "<p>No failed rows.</p>"
    per_class = by.group_by("error_class").agg(pl.col("rows").sum()).sort(["rows", "error_class"], descending=[True, False])
    out = [head, "<div class=\"grid\">",
           _figure(charts.bars(per_class, "error_class", "rows", "Failed rows by class", color=charts.WARN), ""),
           table(by, key=f"{p}.failures"), "</div>"]
    for cls, items in examples.items():
        out.append(f"<h3>{_e(cls)}: first {len(items)}</h3>")
        for item in items:
            ident = item.get(run.id_column)
            out.append(f"<p><b>{_e(ident)}</b> status {_e(_fmt(item.get('status')))}, {_e(item.get('attempts'))} "
                       f"attempt(s)</p><pre>{_e(item.get('message'))}</pre>")
            if item.get("content"):
                out.append(f"<details><summary>raw content</summary><pre>{_e(item['content'])}</pre></details>")
    return "".join(out)


def _outputs(run: RunData, p: str) -> str:
    head = f"<h2 id=\"{p}-outputs\">Outputs</h2>"
    summaries = field_summaries(run.outputs())
    if not summaries:
        return head + "<p class=\"muted\">No typed output fields (no structured.schema, or no answers yet).</p>"
    figs = []
    for s in summaries:
        k = f"{p}.field.{s.name}"
        title = f"{s.name} ({s.kind.replace('_', ' of ')})"
        if s.kind in ("enum", "list", "other", "list_objects"):
            chart = charts.bars(s.table, "value", "count", title if s.kind != "list_objects" else f"{title}: items per row")
        elif s.kind == "boolean":
            chart = charts.shares(s.table, title)
        else:
            chart = charts.histogram(s.table, title, "value" if s.kind == "number" else "characters")
        stats = {"rows": s.rows, "nulls": s.nulls, **s.stats}
        detail = _kv(k, stats, inline=True)
        if s.kind != "number" and s.kind != "text":
            counts = table(s.table, key=f"{k}.count", key_column="value", value_column="count")
            detail += f"<details><summary>table</summary>{counts}</details>"
        for ex in s.examples:
            detail += f"<pre>{_e(ex)}</pre>"
        figs.append(f"<figure data-chart=\"{_e(k)}\">{chart}<figcaption>{detail}</figcaption></figure>")
    return f"{head}<div class=\"grid\">{''.join(figs)}</div>"


def comparison_section(c: Comparison, gold: str | None) -> str:
    out = ["<h2 id=\"compare\">Comparison</h2>",
           "<p class=\"sub\">Rows matched by id; the first folder is the reference. Agreement: share of equal "
           "values; kappa: Cohen's kappa (chance-corrected); numbers: mean absolute difference.</p>",
           "<h3>Cost against agreement</h3><div class=\"grid\">", table(c.cost, key="cmp.cost", key_column="run")]
    y = "gold_accuracy" if c.gold is not None else "agreement_with_reference"
    plot = c.cost.filter(pl.col(y).is_not_null())
    if plot.height:
        out.append(_figure(charts.scatter(plot, "cost_usd", y, "run", f"Cost against {y.replace('_', ' ')}"), ""))
    out.append("</div><h3>Per-field agreement</h3>")
    out.append(table(c.agreement, key="cmp.agreement"))
    if c.gold is not None and c.gold_classes is not None:
        out.append(f"<h3>Against the gold column {_e(gold)} (field {_e(c.gold_field)})</h3>")
        out.append(table(c.gold, key="cmp.gold", key_column="run"))
        out.append(table(c.gold_classes, key="cmp.gold_classes"))
    if c.confusion:
        out.append("<h3>Confusion matrices</h3><div class=\"grid\">")
        for name, df in c.confusion.items():
            out.append(_figure(charts.heatmap(df, "a", "b", name), "rows: a (first run), columns: b"))
        out.append("</div>")
    return "".join(out)


# -- small pieces ----------------------------------------------------------------------------------

def table(df: pl.DataFrame, *, key: str, key_column: str | None = None, value_column: str | None = None) -> str:
    """An HTML table; each cell carries data-k (key.row.column, or key.<key_column value>) and data-v."""
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.iter_rows(named=True)):
        rk = str(row[key_column]) if key_column else str(i)
        cells = []
        for col, v in row.items():
            k = f"{key}.{rk}" if value_column == col else f"{key}.{rk}.{col}"
            cls = " class=\"n\"" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls} data-k=\"{_e(k)}\" data-v=\"{_e(_raw(v))}\">{_e(_fmt(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(prefix: str, values: dict[str, Any], *, inline: bool = False) -> str:
    items = []
    for name, v in values.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in sorted(v.items())) or "none"
        items.append(f"<tr><th>{_e(name)}</th><td data-k=\"{_e(prefix)}.{_e(name)}\" data-v=\"{_e(_raw(v))}\">"
                     f"{_e(_fmt(v))}</td></tr>")
    style = " style=\"margin:2px 0\"" if inline else ""
    return f"<table{style}>{''.join(items)}</table>"


def _card(k: str, v: Any, label: str, text: str | None = None) -> str:
    return (f"<div class=\"card\"><b data-k=\"{_e(k)}\" data-v=\"{_e(_raw(v))}\">{_e(text or _fmt(v))}</b>"
            f"<span>{_e(label)}</span></div>")


def _figure(svg: str, caption: str) -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure>{svg}{cap}</figure>"


def _raw(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _fmt(v: Any, spec: str | None = None) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return format(v, spec) if spec else (f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}")
    return str(v)


def _money(v: float | None) -> str:
    return "–" if v is None else f"${v:,.4f}"


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f} ms" if v < 1 else f"{v:,.2f} s"


def _duration(v: float) -> str:
    m, s = divmod(v, 60)
    return f"{int(m)}m{s:04.1f}s" if m else f"{s:.1f}s"


def _e(v: Any) -> str:
    # A URL inside an answer is shown, never linked: writing its colon as an entity keeps the text the
    # same on screen while the file holds no literal URL for a mail client or scanner to act on.
    return html.escape("" if v is None else str(v), quote=True).replace("://", "&#58;//")
