"""A run keeps its memory for rows: libraries only reading results back needs stay out of the process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, job


def _python(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_run_does_not_import_polars(tmp_path: Path) -> None:
    # polars is ~26 MB resident; a run writes with pyarrow, and only pipeline.load / report read with polars.
    code = ("import sys, pipeline\n"
            "s = pipeline.run(" + repr(job(tmp_path, rows=5)) + ", quiet=True)\n"
            "assert s.exit_code == 0 and s.succeeded == 5, s\n"
            "assert 'polars' not in sys.modules, 'polars imported by a run'\n"
            "df = pipeline.load(" + repr(str(tmp_path / "out")) + ")\n"
            "assert df.height == 5 and 'polars' in sys.modules\n")
    _python(code)


def test_a_run_does_not_import_pandas_and_pandas_works_after_it(tmp_path: Path) -> None:
    # pandas is ~48 MB resident, imported by pyarrow's first list conversion unless held back (common/lean.py).
    code = ("import sys, pipeline, pyarrow as pa\n"
            "s = pipeline.run(" + repr(job(tmp_path, rows=5)) + ", quiet=True)\n"
            "assert s.exit_code == 0 and s.succeeded == 5, s\n"
            "assert 'pandas' not in sys.modules, 'pandas imported by a run'\n"
            # Imported afterwards, pandas objects convert as they always do: NaN is null with from_pandas.
            "import numpy as np, pandas as pd\n"
            "assert pa.array(pd.Series([1.0, np.nan])).null_count == 1\n"
            "df = pipeline.load(" + repr(str(tmp_path / "out")) + ").to_pandas()\n"
            "assert len(df) == 5 and isinstance(df, pd.DataFrame)\n")
    _python(code)


def test_a_caller_with_pandas_keeps_it(tmp_path: Path) -> None:
    code = ("import sys, numpy as np, pandas as pd, pyarrow as pa, pipeline\n"
            "s = pipeline.run(" + repr(job(tmp_path, rows=3)) + ", quiet=True)\n"
            "assert s.exit_code == 0 and s.succeeded == 3, s\n"
            "assert pa.array(pd.Series([1.0, np.nan])).null_count == 1\n")
    _python(code)
