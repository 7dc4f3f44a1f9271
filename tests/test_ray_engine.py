"""run.engine: ray on a real local Ray instance (one per session): same config, CLI, outputs and
guarantees as the local engine; input and outputs on a loopback S3 server."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.read import storage

from .conftest import job, write_rows


def _read(uri: str) -> Any:
    fs, path = storage.filesystem(uri) if storage.is_remote(uri) else (None, uri)
    return pq.read_table(path, filesystem=fs)


def test_ray_engine_local_folder(tmp_path: Path, ray_local: Any) -> None:
    cfg = job(tmp_path, rows=40, input={"batch_size": 10}, run={"engine": "ray", "workers": 2},
              sim={"rate_500": 0.1, "seed": 3})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 40, summary
    ids = _read(str(tmp_path / "out" / "results.parquet"))["rid"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(40)]
    again = pipeline.run(cfg, quiet=True)
    assert again.requests_sent == 0 and again.resumed_rows == 40 and again.succeeded == 40
