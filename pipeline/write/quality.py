"""How good the labels are, from the written results: confidence, the cascade's stages, the audit and its gate.

Read from `results.parquet` once it is merged, so every row of the job counts (rows decided by earlier
runs too, and parts reused as they were). The audit's agreement per field is a share of the audited rows
with a 95% Wilson score interval (it stays inside [0, 1] and is honest for small samples and shares near
1, where the normal approximation is not). The gate (`quality.audit.min_agreement`) fails when a field's
lower bound is under the minimum: the run then ends with exit 4, its outputs written and `output.publish`
skipped (write/publish.py), and the message says which field and by how much.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..common import safefs
from ..common.layout import RESULTS
from ..config import Config
from ..errors import EXIT_FAILED_ROWS, EXIT_OK, EXIT_QUALITY_GATE
from .output import Summary

Z95 = 1.959963984540054
QUALITY_COLUMNS = ("confidence", "cascade_stage", "audit_agrees")  # what the figures read from the results


def wilson(agree: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion agree/n."""
    if n == 0:
        return 0.0, 1.0
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def quality_figures(job: Path, cfg: Config) -> dict[str, Any]:
    """The summary's `quality`: confidence, rows per cascade stage, the audit's agreement per field."""
    if not quality_on(cfg):
        return {}
    return figures_of(_results(job), cfg)


def quality_on(cfg: Config) -> bool:
    """The job measures its labels (confidence, a cascade or an audit): the summary gets `quality`."""
    return cfg.quality.confidence != "off" or bool(cfg.cascade) or cfg.quality.audit is not None


def figures_of(table: pa.Table | None, cfg: Config) -> dict[str, Any]:
    """The summary's `quality` from the results' QUALITY_COLUMNS (any engine's: the local merged file, the
    Ray parts); None: no results yet."""
    out: dict[str, Any] = {"confidence": cfg.quality.confidence}
    if table is None:
        return out
    if "confidence" in table.column_names:
        conf = [c for c in table.column("confidence").to_pylist() if c is not None]
        out["rows_with_confidence"] = len(conf)
        out["mean_confidence"] = round(sum(conf) / len(conf), 4) if conf else None
    if cfg.cascade and "cascade_stage" in table.column_names:
        stages = table.column("cascade_stage").to_pylist()
        out["cascade"] = [{"stage": i + 1, "model": s.model, "min_confidence": s.min_confidence,
                           "rows_decided": sum(1 for x in stages if x == i + 1)} for i, s in enumerate(cfg.cascade)]
    if cfg.quality.audit is not None and "audit_agrees" in table.column_names:
        out["audit"] = _agreement(table.column("audit_agrees").to_pylist(), cfg)
    return out


def _agreement(rows: list[dict[str, bool | None] | None], cfg: Config) -> dict[str, Any]:
    audit = cfg.quality.audit
    assert audit is not None
    audited = [r for r in rows if r is not None]
    fields: dict[str, Any] = {}
    for name in (audited[0].keys() if audited else []):
        votes = [r[name] for r in audited if r.get(name) is not None]
        agree = sum(1 for v in votes if v)
        low, high = wilson(agree, len(votes))
        fields[name] = {"rows": len(votes), "agree": agree,
                        "agreement": round(agree / len(votes), 4) if votes else None,
                        "interval_95": [round(low, 4), round(high, 4)]}
    return {"model": audit.model, "share": audit.share, "seed": audit.seed, "rows": len(audited),
            "min_agreement": audit.min_agreement, "fields": fields}


def apply_gate(summary: Summary, cfg: Config) -> None:
    """Exit 4 when the audit's agreement on a field may be under quality.audit.min_agreement."""
    audit = cfg.quality.audit
    if audit is None or audit.min_agreement is None or summary.exit_code not in (EXIT_OK, EXIT_FAILED_ROWS):
        return
    result = summary.quality.get("audit") or {}
    failing = []
    for name, f in (result.get("fields") or {}).items():
        low, high = f["interval_95"]
        if low < audit.min_agreement:
            failing.append(f"{name} agrees {f['agree']}/{f['rows']} with {audit.model} (95% interval "
                           f"{low:.3f}..{high:.3f}, under min_agreement {audit.min_agreement})")
    if not result.get("fields"):
        failing.append(f"no row was audited (quality.audit.share {audit.share} of {summary.rows_total} rows)")
    summary.quality["gate"] = "failed" if failing else "passed"
    if failing:
        summary.stopped, summary.exit_code = "quality_gate", EXIT_QUALITY_GATE
        summary.stop_message = "quality gate failed: " + "; ".join(failing)
        summary.next_step = ("outputs written but not published; review the disagreements (audit_agrees in "
                             "results.parquet), change the model, prompt or cascade thresholds, or audit more rows "
                             "(quality.audit.share) for a tighter interval, then re-run")


def _results(job: Path) -> pa.Table | None:
    fh = safefs.open_read(job / RESULTS)
    if fh is None:
        return None
    with fh:
        pf = pq.ParquetFile(fh)
        wanted = [c for c in QUALITY_COLUMNS if c in pf.schema_arrow.names]
        return pf.read(columns=wanted)
