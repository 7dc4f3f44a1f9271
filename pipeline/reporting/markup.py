"""Small HTML pieces shared by the report's sections: tables and cards that carry their exact values in
`data-k` / `data-v`, figures, number formats, and escaping.

Every value that came from an output folder is escaped with `e()`: the folder is untrusted, and a model's
answer may well contain markup or URLs (shown as text, never as links).
"""
from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import polars as pl


def table(df: pl.DataFrame, *, key: str, key_column: str | None = None, value_column: str | None = None,
          wide: frozenset[str] = frozenset(), formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """An HTML table; each cell carries data-k (key.row.column, or key.<key_column value>) and data-v.
    Columns named in `wide` hold long text (input, answers): they wrap and get the room. `formats`
    shows a column's values another way (the exact value stays in data-v)."""
    formats = formats or {}
    head = "".join(f"<th>{e(c)}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.iter_rows(named=True)):
        rk = str(row[key_column]) if key_column else str(i)
        cells = []
        for col, v in row.items():
            k = f"{key}.{rk}" if value_column == col else f"{key}.{rk}.{col}"
            cls = "n" if isinstance(v, (int, float)) and not isinstance(v, bool) else "t" if col in wide else ""
            attr = f" class=\"{cls}\"" if cls else ""
            shown = formats[col](v) if col in formats else fmt(v)
            cells.append(f"<td{attr} data-k=\"{e(k)}\" data-v=\"{e(raw(v))}\">{e(shown)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv(prefix: str, values: dict[str, Any], *, inline: bool = False) -> str:
    items = []
    for name, v in values.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in sorted(v.items())) or "none"
        items.append(f"<tr><th>{e(name)}</th><td data-k=\"{e(prefix)}.{e(name)}\" data-v=\"{e(raw(v))}\">"
                     f"{e(fmt(v))}</td></tr>")
    style = " style=\"margin:2px 0\"" if inline else ""
    return f"<table{style}>{''.join(items)}</table>"


def card(k: str, v: Any, label: str, text: str | None = None) -> str:
    return (f"<div class=\"card\"><b data-k=\"{e(k)}\" data-v=\"{e(raw(v))}\">{e(text or fmt(v))}</b>"
            f"<span>{e(label)}</span></div>")


def figure(svg: str, caption: str, *, title: str | None = None, key: str | None = None) -> str:
    """A chart with its title above it in HTML (a long title wraps instead of being clipped by the SVG)."""
    head = f"<div class=\"ft\">{e(title)}</div>" if title else ""
    cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
    attr = f" data-chart=\"{e(key)}\"" if key else ""
    return f"<figure{attr}>{head}{svg}{cap}</figure>"


def cell(k: str, v: Any, text: str | None = None, *, cls: str = "") -> str:
    attr = f" class=\"{cls}\"" if cls else ""
    return f"<td{attr} data-k=\"{e(k)}\" data-v=\"{e(raw(v))}\">{e(text if text is not None else fmt(v))}</td>"


def raw(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def fmt(v: Any, spec: str | None = None) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return format(v, spec) if spec else (f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}")
    return str(v)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def money(v: float | None) -> str:
    return "–" if v is None else f"${v:,.4f}"


def secs(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f} ms" if v < 1 else f"{v:,.2f} s"


def duration(v: float | None) -> str:
    if v is None:
        return "–"
    m, s = divmod(v, 60)
    return f"{int(m)}m{s:04.1f}s" if m else f"{s:.1f}s"


def e(v: Any) -> str:
    # A URL inside an answer is shown, never linked: writing its colon as an entity keeps the text the
    # same on screen while the file holds no literal URL for a mail client or scanner to act on.
    return html.escape("" if v is None else str(v), quote=True).replace("://", "&#58;//")
