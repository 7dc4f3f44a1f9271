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
ACCENT = "#3b6ea8"
WARN = "#c0504d"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
_NAMESPACES = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')


def svg(chart: alt.TopLevelMixin) -> str:
    """Inline SVG for one chart (no XML declaration, no namespace URLs, no script)."""
    # Padding: the viewer's font may measure wider than the renderer's, and labels must not be clipped.
    spec = chart.configure(font=FONT, background="white", padding=14).configure_view(strokeWidth=0).configure_axis(
        labelFontSize=11, titleFontSize=11, grid=True, gridColor="#eee", domainColor="#999", tickColor="#999",
    ).configure_title(fontSize=13, anchor="start").to_dict(validate=False)  # built here, valid; saves ~40%
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
            x=alt.X("start:Q", title=x_title, bin="binned"), x2="end:Q", y=alt.Y("count:Q", title="rows", axis=alt.Axis(tickMinStep=1)),
            tooltip=["start:Q", "end:Q", "count:Q"],
        )
    ]
    rules = [{"name": k, "x": v} for k, v in (marks or {}).items() if v is not None]
    if rules:
        r = alt.Chart(alt.Data(values=rules))
        layers.append(r.mark_rule(color=WARN, strokeDash=[4, 3]).encode(x="x:Q"))
        layers.append(r.mark_text(color=WARN, align="left", dx=3, dy=-4, baseline="top", fontSize=10).encode(
            x="x:Q", y=alt.value(0), text="name:N"))
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


def heatmap(df: pl.DataFrame, row: str, col: str, title: str) -> str:
    """A confusion matrix: counts of (row label, column label) pairs."""
    base = alt.Chart(_values(df), title=title).encode(
        y=alt.Y(f"{row}:N", title=row), x=alt.X(f"{col}:N", title=col, axis=alt.Axis(labelAngle=-30)))
    cells = base.mark_rect().encode(color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None),
                                    tooltip=[f"{row}:N", f"{col}:N", "count:Q"])
    text = base.mark_text(fontSize=11).encode(
        text="count:Q", color=alt.condition(alt.datum.count > 0, alt.value("#111"), alt.value("#bbb")))
    side = max(34 * df.get_column(col).n_unique(), 120)
    return svg((cells + text).properties(width=side, height=max(24 * df.get_column(row).n_unique(), 80)))


def scatter(df: pl.DataFrame, x: str, y: str, label: str, title: str) -> str:
    """Cost against agreement (or accuracy): one labelled point per run."""
    base = alt.Chart(_values(df), title=title).encode(
        x=alt.X(f"{x}:Q", title=x, scale=alt.Scale(zero=True)),
        y=alt.Y(f"{y}:Q", title=y, scale=alt.Scale(domain=[0, 1])))
    points = base.mark_circle(size=90, color=ACCENT).encode(tooltip=[f"{label}:N", f"{x}:Q", f"{y}:Q"])
    text = base.mark_text(align="left", dx=7, fontSize=10).encode(text=f"{label}:N")
    return svg((points + text).properties(width=WIDTH, height=HEIGHT + 40))
