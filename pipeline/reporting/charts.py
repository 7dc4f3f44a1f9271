"""Charts: Altair (Vega-Lite) specs over the small aggregated frames, rendered offline to inline SVG.

vl-convert renders Vega-Lite with an embedded JavaScript engine and no network, so the report needs no
CDN and no script at view time. The SVG loses its namespace attributes: inside HTML5 an <svg> element
needs none, and the report must name no external URL at all (not even the SVG namespace).
"""
from __future__ import annotations

import re
from typing import Any

import polars as pl

from ..errors import UsageError

try:
    import altair as alt
    import vl_convert as vlc
except ImportError as exc:  # an optional extra: say how to get it rather than show a traceback
    raise UsageError(f"the report needs the 'report' extra ({exc.name} is not installed): "
                     "pip install 'llm-batch-pipeline[report]'") from None

WIDTH = 380
HEIGHT = 170
LABEL_CHARS = 24
ACCENT = "#3b6ea8"
WARN = "#c0504d"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
_NAMESPACES = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')


def svg(chart: alt.TopLevelMixin) -> str:
    """Inline SVG for one chart (no XML declaration, no namespace URLs, no script)."""
    # Padding: the viewer's font may measure wider than the renderer's, and labels must not be clipped.
    # labelOverlap: a dense axis drops every other label instead of printing them over each other.
    spec = chart.configure(font=FONT, background="white", padding=14).configure_view(strokeWidth=0).configure_axis(
        labelFontSize=11, titleFontSize=11, grid=True, gridColor="#eee", domainColor="#999", tickColor="#999",
        labelOverlap="greedy", labelSeparation=8, titlePadding=12,  # room for a viewer's font wider than ours
    ).configure_title(fontSize=13, anchor="start", limit=WIDTH).to_dict(validate=False)  # built here, valid; saves ~40%
    # Labels come from answers: a URL among them is text, written so that the file holds no literal URL.
    return _NAMESPACES.sub("", vlc.vegalite_to_svg(spec), count=2).replace("://", "&#58;//")


def _values(df: pl.DataFrame) -> alt.Data:
    # Plain JSON-able rows: no pandas round-trip, and the spec holds only the aggregated table.
    return alt.Data(values=df.to_dicts())


def bars(df: pl.DataFrame, value: str, count: str, title: str, *, color: str = ACCENT, sort: bool = True,
         width: int = WIDTH) -> str:
    """Horizontal bars, one per category, in the frame's order (most common first)."""
    order = [str(v) for v in df.get_column(value).to_list()] if sort else None
    height = max(18 * df.height, 30)
    base = alt.Chart(_values(df.with_columns(pl.col(value).cast(pl.String).fill_null("(null)"))), title=title)
    bar = base.mark_bar(color=color).encode(
        y=alt.Y(f"{value}:N", sort=order, title=None, axis=alt.Axis(labelLimit=180)),
        x=alt.X(f"{count}:Q", title=count, axis=alt.Axis(tickMinStep=1)),
        tooltip=[f"{value}:N", f"{count}:Q"],
    )
    text = base.mark_text(align="left", dx=3, fontSize=10, color="#333").encode(
        y=alt.Y(f"{value}:N", sort=order), x=f"{count}:Q", text=alt.Text(f"{count}:Q", format=",")
    )
    return svg((bar + text).properties(width=width, height=height))


def histogram(df: pl.DataFrame, title: str, x_title: str, *, marks: dict[str, float | None] | None = None) -> str:
    """Bars over [start, end) bins; optional labelled rules (p50/p90/p99)."""
    layers: list[Any] = [
        alt.Chart(_values(df)).mark_bar(color=ACCENT, stroke="white", strokeWidth=0.5).encode(
            x=alt.X("start:Q", title=x_title, bin="binned", axis=alt.Axis(tickCount=8)), x2="end:Q",
            y=alt.Y("count:Q", title="rows", axis=alt.Axis(tickMinStep=1)),
            tooltip=["start:Q", "end:Q", "count:Q"],
        )
    ]
    # Each label on its own line (p50 at the top, then p90, p99): close quantiles must not print over each other.
    rules = [{"name": k, "x": v, "y": 13 * i} for i, (k, v) in enumerate((marks or {}).items()) if v is not None]
    if rules:
        r = alt.Chart(alt.Data(values=rules))
        layers.append(r.mark_rule(color=WARN, strokeDash=[4, 3]).encode(x="x:Q"))
        layers.append(r.mark_text(color=WARN, align="left", dx=3, dy=-4, baseline="top", fontSize=10).encode(
            x="x:Q", y=alt.Y("y:Q", scale=None), text="name:N"))
    return svg(alt.layer(*layers, title=title).properties(width=WIDTH, height=HEIGHT))


def throughput(df: pl.DataFrame, pauses: list[dict[str, float]], title: str) -> str:
    """Answers per second over the run, with 429 pauses drawn as shaded spans."""
    layers: list[Any] = []
    if pauses:
        spans = [{"t_s": p["t_s"], "end": p["t_s"] + p["seconds"], "what": "429 pause"} for p in pauses]
        layers.append(alt.Chart(alt.Data(values=spans)).mark_rect(color=WARN, opacity=0.18).encode(
            x="t_s:Q", x2="end:Q", tooltip=["t_s:Q", "end:Q", "what:N"]))
    layers.append(alt.Chart(_values(df)).mark_area(
        line={"color": ACCENT}, color=ACCENT, opacity=0.35, interpolate="step-after").encode(
        x=alt.X("t_s:Q", title="seconds since the first answer"), y=alt.Y("per_s:Q", title="answers / s"),
    ))
    return svg(alt.layer(*layers, title=title).properties(width=WIDTH + 40, height=HEIGHT))


def shares(df: pl.DataFrame, title: str) -> str:
    """One stacked bar of shares (true / false / null)."""
    chart = alt.Chart(_values(df), title=title).mark_bar().encode(
        x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"), title=None),
        color=alt.Color("value:N", scale=alt.Scale(domain=["true", "false", "null"],
                                                   range=[ACCENT, "#e0a040", "#bbb"]), title=None),
        tooltip=["value:N", "count:Q", alt.Tooltip("share:Q", format=".1%")],
    )
    return svg(chart.properties(width=WIDTH, height=28))


def heatmap(df: pl.DataFrame, row: str, col: str, row_title: str, col_title: str) -> str:
    """A confusion matrix: counts of (row label, column label) pairs, the axes named after what they hold.

    No gridlines (they would cross the numbers); columns wide enough for their labels written across,
    or labels turned upright when that would make the matrix wider than a figure."""
    labels = [str(v) for v in df.get_column(col).unique().to_list()]
    longest = max((len(v) for v in labels), default=1)
    cell = max(40, 7 * min(longest, LABEL_CHARS) + 12)
    upright = cell * len(labels) > 2 * WIDTH
    cell = 30 if upright else cell
    base = alt.Chart(_values(df)).encode(
        y=alt.Y(f"{row}:N", title=_short(row_title), axis=alt.Axis(grid=False, labelLimit=LABEL_CHARS * 7)),
        x=alt.X(f"{col}:N", title=_short(col_title), axis=alt.Axis(
            grid=False, labelAngle=-90 if upright else 0, labelLimit=LABEL_CHARS * 7, orient="bottom")))
    cells = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None),
        tooltip=[f"{row}:N", f"{col}:N", "count:Q"])
    text = base.mark_text(fontSize=11).encode(
        text="count:Q", color=alt.condition(alt.datum.count > 0, alt.value("#111"), alt.value("#bbb")))
    rows = df.get_column(row).n_unique()
    return svg((cells + text).properties(width=cell * len(labels), height=max(26 * rows, 80)))


def reliability(bins: pl.DataFrame) -> str:
    """Accuracy against mean confidence per bin (point size: rows), with the diagonal of perfect calibration."""
    data = bins.filter(pl.col("rows") > 0)
    diagonal = alt.Chart(alt.Data(values=[{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 1.0}])).mark_line(
        color="#999", strokeDash=[4, 3]).encode(x="x:Q", y="y:Q")
    scale = alt.Scale(domain=[0, 1], nice=False)
    base = alt.Chart(_values(data)).encode(
        x=alt.X("mean_confidence:Q", title="confidence (bin mean)", scale=scale, axis=alt.Axis(format=".1f")),
        y=alt.Y("accuracy:Q", title="accuracy", scale=scale, axis=alt.Axis(format=".1f")))
    line = base.mark_line(color=ACCENT, point=False)
    points = base.mark_circle(color=ACCENT, opacity=0.85).encode(
        size=alt.Size("rows:Q", legend=None, scale=alt.Scale(range=[30, 300])),
        tooltip=["lo:Q", "hi:Q", "rows:Q", alt.Tooltip("mean_confidence:Q", format=".3f"),
                 alt.Tooltip("accuracy:Q", format=".3f")])
    return svg(alt.layer(diagonal, line, points).properties(width=260, height=220))


def _short(title: str) -> str:
    return title if len(title) <= 48 else title[:47] + "…"


def scatter(df: pl.DataFrame, x: str, y: str, label: str) -> str:
    """Cost against agreement (or accuracy): one point per run, named in the legend (labels beside the
    points would print over each other when two runs cost about the same)."""
    chart = alt.Chart(_values(df)).mark_point(size=110, filled=True, opacity=0.9).encode(
        x=alt.X(f"{x}:Q", title=x.replace("_usd", " (USD)").replace("_", " "), scale=alt.Scale(zero=True)),
        y=alt.Y(f"{y}:Q", title=y.replace("_", " "), scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color(f"{label}:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical",
                                                                     labelLimit=2 * WIDTH)),
        tooltip=[f"{label}:N", f"{x}:Q", f"{y}:Q"])
    return svg(chart.properties(width=WIDTH, height=HEIGHT + 40))
