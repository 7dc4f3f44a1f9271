"""The report's "Trusting the labels" block of one run: confidence, the cascade's stages, the audit and its
gate, as summary.json's `quality` has them (write/quality.py). Nothing when the run measured none."""
from __future__ import annotations

from typing import Any

import polars as pl

from .data import RunData
from .markup import e, kv, table


def quality_section(run: RunData, p: str) -> str:
    q: dict[str, Any] = (run.summary or {}).get("quality") or {}
    if not q:
        return ""
    parts = [f"<h3 id=\"{p}-quality\">Trusting the labels</h3>"]
    gate = q.get("gate")
    if gate == "failed":
        parts.append(f"<p class=\"warn\">{e((run.summary or {}).get('stop_message') or 'quality gate failed')}</p>")
    parts.append(kv(f"{p}.quality", {"confidence": q.get("confidence"), "mean_confidence": q.get("mean_confidence"),
                                      "rows_with_confidence": q.get("rows_with_confidence"), "gate": gate}))
    if q.get("cascade"):
        stages = pl.DataFrame(q["cascade"], schema={"stage": pl.Int64, "model": pl.String,
                                                    "min_confidence": pl.Float64, "rows_decided": pl.Int64})
        parts.append("<h4>Cascade: rows decided per stage</h4>" + table(stages, key=f"{p}.cascade",
                                                                        key_column="stage"))
    audit = q.get("audit") or {}
    if audit.get("fields"):
        rows = [{"field": name, "rows": f["rows"], "agree": f["agree"], "agreement": f["agreement"],
                 "low_95": f["interval_95"][0], "high_95": f["interval_95"][1]} for name, f in audit["fields"].items()]
        df = pl.DataFrame(rows, schema={"field": pl.String, "rows": pl.Int64, "agree": pl.Int64,
                                        "agreement": pl.Float64, "low_95": pl.Float64, "high_95": pl.Float64})
        bar = audit.get("min_agreement")
        parts.append(f"<h4>Audit: agreement with {e(audit.get('model'))} on {e(audit.get('rows'))} sampled rows"
                     + (f" (gate: lower bound &ge; {e(bar)})" if bar is not None else "") + "</h4>"
                     + table(df, key=f"{p}.audit", key_column="field"))
    return "".join(parts)
