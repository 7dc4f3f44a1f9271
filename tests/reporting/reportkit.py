"""Helpers for the report and review tests: read the figures a report carries, write a small job folder
by hand (results.parquet with the `confidence` columns, a manifest naming the id column and schema), and
measure a page's layout in headless Chromium."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import polars as pl
import yaml

import pipeline

REPO = Path(__file__).resolve().parents[2]

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# No network at all, and none of the browser's own background traffic: the page must stand alone.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND"]
SCHEMA = {"type": "object", "required": ["sentiment"], "additionalProperties": False,
          "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]}}}


class Figures(HTMLParser):
    """data-k -> data-v pairs, element ids in document order and the number of inline <svg> charts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.ids: list[str] = []
        self.svgs = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-k" in a:
            self.values[str(a["data-k"])] = a.get("data-v") or ""
        if "id" in a:
            self.ids.append(str(a["id"]))
        self.svgs += tag == "svg"


def demo_job(base: Path, name: str, rows: list[dict[str, Any]], *, model: str, columns: list[str],
             quality: dict[str, Any] | None = None) -> Path:
    """Label `rows` with the demo's job on the simulator, from a config file of its own (so the job
    folder's manifest names a config that rebuilds it, input included, as a CLI run's does)."""
    data = base / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["input"].update(path=str(data), columns=columns)
    cfg["endpoint"].update(model=model, simulator={**cfg["endpoint"]["simulator"], "latency_ms": 0, "rate_429": 0,
                                                   "rate_503": 0})
    cfg["structured"]["schema"] = str((REPO / "configs" / cfg["structured"]["schema"]).resolve())
    cfg["output"]["dir"] = str(base / name)
    if quality:
        cfg["quality"] = quality
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pipeline.run(str(path), quiet=True)
    return base / name


def with_confidence(out: Path, salt: int = 0) -> pl.DataFrame:
    """The results, with a spread of row confidences written in when the run measured none (the column
    contract: `confidence`, a float or null)."""
    res = pl.read_parquet(out / "results.parquet")
    if "confidence" not in res.columns or res.get_column("confidence").null_count() == res.height:
        conf = [round(0.5 + ((i + 7 * salt) * 37 % 50) / 100, 2) for i in range(res.height)]   # 0.5 .. 0.99
        res = res.drop("confidence", strict=False).with_columns(pl.Series("confidence", conf, dtype=pl.Float64))
        res.write_parquet(out / "results.parquet")
    return res


def write_job(path: Path, rows: list[dict[str, Any]], *, model: str) -> Path:
    """A job folder as the runner leaves it, for the columns the report reads: id, a carried `gold`
    column, `output` {sentiment}, `confidence`, `confidence_by_field` {sentiment}, model and cost."""
    path.mkdir(parents=True)
    df = pl.DataFrame({
        "id": [r["id"] for r in rows],
        "gold": pl.Series([r.get("gold") for r in rows], dtype=pl.String),
        "output": pl.DataFrame({"sentiment": pl.Series([r["sentiment"] for r in rows], dtype=pl.Categorical)}
                               ).to_struct("output"),
        "model": [model] * len(rows),
        "cost_usd": [0.001] * len(rows),
        "confidence": pl.Series([r.get("confidence") for r in rows], dtype=pl.Float64),
        "confidence_by_field": pl.DataFrame({"sentiment": pl.Series([r.get("confidence") for r in rows],
                                                                    dtype=pl.Float64)}).to_struct("cbf"),
    })
    df.write_parquet(path / "results.parquet")
    manifest = {"model": model, "request": {"input": {"id_column": "id"},
                                            "structured": {"schema": SCHEMA}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


MEASURE = """
(function(){
  const out = {overflow: [], clipped: [], overlaps: [], grids: [], titles: [], order: [], width: 0};
  const W = document.documentElement.clientWidth;
  out.width = [document.documentElement.scrollWidth, W];
  const r = (e) => e.getBoundingClientRect();
  const shown = (t) => t.textContent.trim() && t.getAttribute('opacity') !== '0';
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg') && el.tagName.toLowerCase() !== 'svg') continue;
    const b = r(el);
    if (b.width === 0 && b.height === 0) continue;
    if (b.right > W + 0.5 || b.left < -0.5)
      out.overflow.push([el.tagName, el.textContent.slice(0, 60), b.left, b.right]);
    const p = el.parentElement;
    if (p && !p.closest('svg') && p.tagName !== 'BODY' && p.tagName !== 'HTML' && b.right > r(p).right + 1
        && getComputedStyle(p).overflowX === 'visible')
      out.overflow.push(['child', el.tagName, p.tagName, el.textContent.slice(0, 60), b.right, r(p).right]);
  }
  document.querySelectorAll('svg').forEach((svg, i) => {
    const sb = r(svg);
    svg.querySelectorAll('text').forEach(t => {
      if (!shown(t)) return;
      const b = r(t);
      if (b.left < sb.left - 0.5 || b.right > sb.right + 0.5 || b.top < sb.top - 0.5 || b.bottom > sb.bottom + 0.5)
        out.clipped.push([i, t.textContent]);
    });
    svg.querySelectorAll('g.role-axis-label').forEach(g => {
      const ts = [...g.querySelectorAll('text')].filter(shown).map(t => [t.textContent, r(t)]);
      for (let a = 0; a < ts.length; a++) for (let c = a + 1; c < ts.length; c++) {
        const A = ts[a][1], C = ts[c][1];
        if (A.left < C.right - 0.5 && C.left < A.right - 0.5 && A.top < C.bottom - 0.5 && C.top < A.bottom - 0.5)
          out.overlaps.push([i, ts[a][0], ts[c][0]]);
      }
    });
    svg.querySelectorAll('g.role-axis').forEach(axis => {
      const title = [...axis.querySelectorAll('g.role-axis-title text')].filter(shown).map(r);
      const labels = [...axis.querySelectorAll('g.role-axis-label text')].filter(shown);
      for (const T of title) for (const l of labels) {
        const L = r(l);
        if (T.left < L.right - 0.5 && L.left < T.right - 0.5 && T.top < L.bottom - 0.5 && L.top < T.bottom - 0.5)
          out.overlaps.push([i, 'axis title', l.textContent]);
      }
    });
    const marks = [...svg.querySelectorAll('g.mark-text:not([class*="role-axis"]):not([class*="role-legend"]) text')]
      .filter(shown).map(t => [t.textContent, r(t)]);
    for (let a = 0; a < marks.length; a++) for (let c = a + 1; c < marks.length; c++) {
      const A = marks[a][1], C = marks[c][1];
      if (A.left < C.right - 0.5 && C.left < A.right - 0.5 && A.top < C.bottom - 0.5 && C.top < A.bottom - 0.5)
        out.overlaps.push([i, marks[a][0], marks[c][0]]);
    }
    const fig = svg.closest('figure');
    const key = fig ? fig.getAttribute('data-chart') : null;
    out.grids.push([key, svg.querySelectorAll('g.role-axis-grid line, g.role-axis-grid path').length]);
    out.titles.push([key, [...svg.querySelectorAll('g.role-axis-title text')].map(t => t.textContent)]);
  });
  out.order = [...document.querySelectorAll('h2[id]')].map(h => [h.id, r(h).top]);
  document.body.setAttribute('data-measure', JSON.stringify(out));
})();
"""


def measure(page: Path, width: int = 1400) -> dict[str, Any]:
    """Open a copy of the page with a measuring script in headless Chromium and read back what it found:
    elements past the viewport or their parent, SVG text outside its SVG, overlapping axis labels, grid
    lines and axis titles per chart, and the sections' order."""
    assert BROWSER is not None
    probe = page.with_name(page.stem + ".measure.html")
    probe.write_text(page.read_text().replace("</body>", f"<script>{MEASURE}</script></body>"))
    run = subprocess.run([BROWSER, *FLAGS, f"--window-size={width},2000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, cwd=page.parent)
    found = re.search(r'data-measure="([^"]*)"', run.stdout)
    assert run.returncode == 0 and found, run.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))  # type: ignore[no-any-return]


def screenshot(page: Path, dest: Path, width: int = 1400, height: int = 2000) -> None:
    assert BROWSER is not None
    run = subprocess.run([BROWSER, *FLAGS, f"--window-size={width},{height}", f"--screenshot={dest}", page.as_uri()],
                         capture_output=True, text=True, timeout=120, cwd=page.parent)
    assert run.returncode == 0 and dest.exists(), run.stderr[-2000:]
