"""The report as one self-contained HTML document: inline CSS, inline SVG charts, no script, no URL.

Every value that came from the output folder (ids, messages, raw content, labels) is escaped: the folder
is untrusted, and a model's answer may well contain markup or URLs (shown as text, never as links). Figures
carry their exact value in a `data-k` / `data-v` pair so that tools (and the tests) can read them back without
parsing formatted text.
"""
from __future__ import annotations

import time
from typing import Any

import polars as pl

from . import charts
from .compare import Comparison
from .data import RunData
from .figures import TAIL_FACTOR, failure_figures, field_summaries, job_totals, run_figures, time_figures
from .html_compare import comparison_section
from .html_quality import quality_section
from .markup import card as _card
from .markup import cell, table
from .markup import duration as _duration
from .markup import e as _e
from .markup import figure as _figure
from .markup import fmt as _fmt
from .markup import kv as _kv
from .markup import money as _money
from .markup import secs as _secs

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
.pr h4{font-size:14px;margin:16px 0 6px}.pr .ft{font-size:13px;font-weight:600;color:#2c3e55;margin:0 0 4px;
 max-width:520px;overflow-wrap:anywhere}
.pr td.t{overflow-wrap:anywhere;min-width:8em;max-width:420px}.pr table.rows td.t{max-width:none}
.pr table.rows{width:100%}.pr table.side th{white-space:nowrap}.pr table.side td.t{min-width:10em}
"""


def document(runs: list[RunData], body: str) -> str:
    """The whole page around a fragment."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>pipeline report: {_e(', '.join(r.path.name for r in runs))}</title></head>"
            f"<body style=\"margin:0;background:#fff\">{body}</body></html>\n")


def fragment(runs: list[RunData], comparison: Comparison | None) -> str:
    """The report's body inside one scoped <div> (also what a notebook shows): the comparison (or the
    scores against gold) first, then each run's own sections."""
    parts = [f"<div class=\"pr\"><style>{CSS}</style><h1>pipeline report</h1>",
             f"<p class=\"sub\">{_e(', '.join(str(r.path) for r in runs))} · generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>", _nav(runs, comparison)]
    if comparison is not None:
        parts.append(comparison_section(comparison, runs))
    for i, run in enumerate(runs):
        parts.append(run_sections(run, f"r{i}", multiple=len(runs) > 1))
    parts.append("</div>")
    return "".join(parts)


def _nav(runs: list[RunData], comparison: Comparison | None) -> str:
    links = []
    if comparison is not None:
        links.append(f"<a href=\"#compare\">{'Comparison' if len(runs) > 1 else 'Against gold'}</a>")
    for i, run in enumerate(runs):
        tag = f" ({_e(run.model)})" if len(runs) > 1 else ""
        links += [f"<a href=\"#r{i}-{s}\">{s.capitalize()}{tag}</a>" for s in ("run", "time", "failures", "outputs")]
    return f"<nav>{''.join(links)}</nav>"


def run_sections(run: RunData, p: str, *, multiple: bool) -> str:
    title = f" — {_e(run.label)}" if multiple else f" — {_e(run.model)}"
    return "".join([_run(run, p, title), quality_section(run, p), _time(run, p), _failures(run, p), _outputs(run, p)])


def _run(run: RunData, p: str, title: str) -> str:
    f = run_figures(run)
    cards = [
        _card(f"{p}.succeeded", f["succeeded"], "succeeded"), _card(f"{p}.failed", f["failed"], "failed"),
        _card(f"{p}.pending", f["pending"], "pending"), _card(f"{p}.rows_total", f["rows_total"], "rows in input"),
        _card(f"{p}.cost_usd", f["cost_usd"], "cost (USD, whole job)", f"${f['cost_usd']:,.4f}"),
        _card(f"{p}.cost_per_1k_rows", f["cost_per_1k_rows"], "USD per 1,000 rows", _money(f["cost_per_1k_rows"])),
        _card(f"{p}.prompt_tokens", f["prompt_tokens"], "prompt tokens (whole job)"),
        _card(f"{p}.completion_tokens", f["completion_tokens"], "completion tokens (whole job)"),
        _card(f"{p}.cache_hit_share", f["cache_hit_share"], "prompt tokens read from the provider's cache",
              f"{f['cache_hit_share']:.0%}"),
        _card(f"{p}.cache_saved_usd", f["cache_saved_usd"], "saved by the prompt cache (USD)",
              _money(f["cache_saved_usd"])),
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
                    "exit_code": f["exit_code"], "stopped": f["stopped"], "structured_mode": f["structured_mode"]})
    stop = f"<p class=\"warn\">stopped: {_e(f['stop_message'] or f['stopped'])}</p>" if f["stopped"] else ""
    missing = "" if run.summary else "<p class=\"warn\">no summary.json: the figures come from the outputs</p>"
    return (f"<h2 id=\"{p}-run\">Run{title}</h2>{missing}{stop}<div class=\"cards\">{''.join(cards)}</div>"
            f"<div class=\"grid\">{_totals(run, p, f)}{''.join(figs)}{extra}</div>{_history(run, p)}")


def _totals(run: RunData, p: str, f: dict[str, Any]) -> str:
    """This invocation's figures beside the job's (every run in history.jsonl)."""
    job = job_totals(run)
    rows = [("runs", "runs", 1, None, job["runs"], None),
            ("rows", "rows answered or failed", f["rows_done_run"], None, f["succeeded"] + f["failed"], None),
            ("requests_sent", "requests sent", f["requests_sent"], None, job["requests"], None),
            ("run_cost_usd", "cost (USD)", f["run_cost_usd"], _money(f["run_cost_usd"]), f["cost_usd"],
             _money(f["cost_usd"])),
            ("wall_s", "wall time", f["wall_s"], _duration(f["wall_s"]), job["wall_s"], _duration(job["wall_s"])),
            ("rows_per_s", "rows / s", f["rows_per_s"], _fmt(f["rows_per_s"], ".1f"), None, None)]
    body = "".join(
        f"<tr><th>{_e(what)}</th>{cell(f'{p}.{key}', v, t, cls='n')}{cell(f'{p}.job.{key}', jv, jt, cls='n')}</tr>"
        for key, what, v, t, jv, jt in rows)
    return (f"<table class=\"totals\"><thead><tr><th></th><th>this run</th><th>whole job</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _history(run: RunData, p: str) -> str:
    """The last runs, in columns that fit the page: counts grouped, the stop reason and message wrapped."""
    if not run.history:
        return "<p class=\"muted\">No run history (history.jsonl) in this folder.</p>"
    shown = run.history[-HISTORY_ROWS:]
    rows = [{"run_id": _fmt_history(h.get("run_id")), "started_at": _when(h.get("started_at")),
             "exit_code": _fmt_history(h.get("exit_code")),
             "rows new / reused / removed": _slash(h, "rows_new", "rows_reused", "rows_removed"),
             "succeeded / failed / pending": _slash(h, "succeeded", "failed", "pending"),
             "requests": _fmt_history(h.get("requests")), "retries": _fmt_history(h.get("retries")),
             "cost_usd": _fmt_history(h.get("cost_usd")),
             "stopped": ": ".join(str(x) for x in (h.get("stop_reason"), h.get("message")) if x) or None}
            for h in shown]
    df = pl.DataFrame(rows, schema={c: pl.String for c in rows[0]})
    earlier = len(run.history) - len(shown)
    note = f"<p class=\"muted\">{earlier:,} earlier runs not shown.</p>" if earlier else ""
    return (f"<h3>Run history (history.jsonl)</h3>{note}"
            f"{table(df, key=f'{p}.history', wide=frozenset({'stopped', 'retries'}))}")


def _slash(h: dict[str, Any], *keys: str) -> str:
    return " / ".join(_fmt_history(h.get(k)) or "–" for k in keys)


def _when(v: Any) -> str | None:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' (the history's own text when it is not one)."""
    text = _fmt_history(v)
    return text.replace("T", " ")[:19] if text and len(text) >= 19 and text[10:11] == "T" else text


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
    per_class = by.group_by("error_class").agg(pl.col("rows").sum()).sort(["rows", "error_class"],
                                                                          descending=[True, False])
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
            chart = charts.bars(s.table, "value", "count",
                                title if s.kind != "list_objects" else f"{title}: items per row")
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
