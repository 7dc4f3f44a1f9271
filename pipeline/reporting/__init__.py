"""See what a job did: an offline HTML report, model comparison and gold scores, one row's story.

    pipeline report OUT_DIR [OUT_DIR ...] [-o report.html] [--gold COLUMN] [--by COLUMN] [--target-precision P]
    pipeline review export OUT_DIR --below 0.8 --sample 50 -o tasks.json    |    pipeline review import OUT_DIR FILE
    pipeline show OUT_DIR ROW_ID
    pipeline.report(["out/a", "out/b"], gold="label")   # in a notebook: shows inline, holds the tables

Modules: data (read a folder), figures (the numbers, with polars), charts (Altair -> inline SVG),
gold (gold labels: a carried column or the stored human labels), compare (agreement, confusion, gold
scores), calibration (reliability, ECE, thresholds), examples (disagreements, samples), slices (--by), inputs
(a row's input text), markup / html / html_compare (the document), review and labelstudio (the human
review loop), show (one row), status (where a job stands).
The package is `reporting`, not `report`: `pipeline.report` is this module's `report()` function, and a
sub-package of that name would replace it on the `pipeline` module as soon as any of its modules is imported.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ..common import safefs
from ..errors import UsageError
from .compare import Comparison, compare
from .data import RunData, load_run
from .gold import stored_gold
from .html import document, fragment

__all__ = ["Report", "report", "write_report"]

PathLike = str | os.PathLike[str]


class Report:
    """A built report: `.html` (the document), `.tables` (polars frames), shown inline by Jupyter."""

    def __init__(self, runs: list[RunData], comparison: Comparison | None) -> None:
        self.runs, self.comparison = runs, comparison
        self._body: str | None = None

    @property
    def html(self) -> str:
        """The self-contained document (charts are rendered once, on first use)."""
        return document(self.runs, self._repr_html_())

    @property
    def tables(self) -> dict[str, pl.DataFrame]:
        """Comparison tables (agreement, cost, gold, gold_classes, calibration, confusion ...); empty for one
        folder without gold."""
        return self.comparison.tables() if self.comparison is not None else {}

    def save(self, path: PathLike) -> Path:
        """Write the document atomically (temp file + rename)."""
        dest = Path(path)
        _check_destination(dest)
        try:
            safefs.write_atomic(dest, self.html.encode("utf-8"))  # often into an output.dir: never through a link
        except (NotADirectoryError, FileNotFoundError, IsADirectoryError) as exc:
            raise UsageError(_cannot_write(dest, exc.strerror or str(exc))) from None
        return dest

    def _repr_html_(self) -> str:
        if self._body is None:
            self._body = fragment(self.runs, self.comparison)
        return self._body

    def __repr__(self) -> str:
        return f"Report({', '.join(str(r.path) for r in self.runs)}; tables: {', '.join(self.tables) or 'none'})"


def report(out_dirs: PathLike | Sequence[PathLike], *, gold: str | None = None, by: str | None = None,
           target_precision: float | None = None) -> Report:
    """Read one or more output folders. Several folders, gold (a carried column, or the human labels
    `pipeline review import` stored beside a job) or a slice column add the comparison, shown first."""
    dirs = [out_dirs] if isinstance(out_dirs, (str, os.PathLike)) else list(out_dirs)
    if not dirs:
        raise UsageError("give at least one output folder")
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise UsageError(f"--target-precision {target_precision}: give a precision between 0 and 1 (e.g. 0.98)")
    runs = [load_run(Path(d)) for d in dirs]
    comparison = None
    if len(runs) > 1 or gold or by or target_precision is not None or stored_gold(runs) is not None:
        comparison = compare(runs, gold, by=by, target_precision=target_precision)
    if target_precision is not None and (comparison is None or comparison.gold is None):
        raise UsageError("--target-precision needs gold labels: give --gold COLUMN, or import human labels with "
                         "`pipeline review import OUT_DIR FILE`")
    return Report(runs, comparison)


def write_report(out_dirs: Sequence[PathLike], output: PathLike, *, gold: str | None = None, by: str | None = None,
                 target_precision: float | None = None) -> tuple[Path, float]:
    """Build and save; returns the path and the seconds it took (the CLI prints both)."""
    started = time.perf_counter()
    _check_destination(Path(output))  # before the minutes a big report may take, not after
    path = report(out_dirs, gold=gold, by=by, target_precision=target_precision).save(output)
    return path, time.perf_counter() - started


def _check_destination(dest: Path) -> None:
    """-o must name a file in an existing folder (a path under a file, or a folder, is said, not a crash)."""
    folder = dest.parent
    if dest.is_dir():
        raise UsageError(_cannot_write(dest, "it is a folder"))
    if not folder.is_dir():
        why = "not a folder" if folder.exists() else "no such folder"
        raise UsageError(_cannot_write(dest, f"{folder} is {why}" if folder.exists() else f"{folder}: {why}"))


def _cannot_write(dest: Path, why: str) -> str:
    return f"cannot write the report to {dest} ({why}); give -o a file name in an existing folder"
