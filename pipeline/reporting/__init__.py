"""See what a job did: an offline HTML report, model comparison and gold scores, one row's story.

    pipeline report OUT_DIR [OUT_DIR ...] [-o report.html] [--gold COLUMN]
    pipeline show OUT_DIR ROW_ID
    pipeline.report(["out/a", "out/b"], gold="label")   # in a notebook: shows inline, holds the tables

Modules: data (read a folder), figures (the numbers, with polars), charts (Altair -> inline SVG),
compare (agreement, confusion, gold scores), html (the document), show (one row).
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
from .html import document, fragment

__all__ = ["Report", "report", "write_report"]

PathLike = str | os.PathLike[str]


class Report:
    """A built report: `.html` (the document), `.tables` (polars frames), shown inline by Jupyter."""

    def __init__(self, runs: list[RunData], comparison: Comparison | None, gold: str | None) -> None:
        self.runs, self.comparison, self.gold = runs, comparison, gold
        self._body: str | None = None

    @property
    def html(self) -> str:
        """The self-contained document (charts are rendered once, on first use)."""
        return document(self.runs, self._repr_html_())

    @property
    def tables(self) -> dict[str, pl.DataFrame]:
        """Comparison tables (agreement, cost, gold, gold_classes, confusion ...); empty for one folder."""
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
            self._body = fragment(self.runs, self.comparison, gold=self.gold)
        return self._body

    def __repr__(self) -> str:
        return f"Report({', '.join(str(r.path) for r in self.runs)}; tables: {', '.join(self.tables) or 'none'})"


def report(out_dirs: PathLike | Sequence[PathLike], *, gold: str | None = None) -> Report:
    """Read one or more output folders; two or more (or a gold column) add the comparison."""
    dirs = [out_dirs] if isinstance(out_dirs, (str, os.PathLike)) else list(out_dirs)
    if not dirs:
        raise UsageError("give at least one output folder")
    runs = [load_run(d) for d in dirs]
    comparison = compare(runs, gold) if len(runs) > 1 or gold else None
    return Report(runs, comparison, gold)


def write_report(out_dirs: Sequence[PathLike], output: PathLike, *, gold: str | None = None) -> tuple[Path, float]:
    """Build and save; returns the path and the seconds it took (the CLI prints both)."""
    started = time.perf_counter()
    _check_destination(Path(output))  # before the minutes a big report may take, not after
    path = report(out_dirs, gold=gold).save(output)
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
