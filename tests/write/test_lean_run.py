"""A run keeps its memory for rows: libraries only reading results back needs stay out of the process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, job


def test_a_run_does_not_import_polars(tmp_path: Path) -> None:
    # polars is ~26 MB resident; a run writes with pyarrow, and only pipeline.load / report read with polars.
    code = ("import sys, pipeline\n"
            "s = pipeline.run(" + repr(job(tmp_path, rows=5)) + ", quiet=True)\n"
            "assert s.exit_code == 0 and s.succeeded == 5, s\n"
            "assert 'polars' not in sys.modules, 'polars imported by a run'\n"
            "df = pipeline.load(" + repr(str(tmp_path / "out")) + ")\n"
            "assert df.height == 5 and 'polars' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
