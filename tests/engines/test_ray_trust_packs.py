"""A packed cascade with an audit on run.engine: ray (real local Ray): every worker packs each stage's rows
as the local engine does, so the decisions, confidences and columns are the local engine's (Ray's shards
may cut the input where the local batches do not, so packs, and with them each row's share of a pack's
bill, may differ), and a re-run answers every stage from the journal."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import pipeline
from tests.e2e.test_cascade import trust_job
from tests.engines.test_ray_trust import _decisions, _ray_results

ROWS = 60


def test_a_packed_cascade_on_ray_decides_as_the_local_engine(tmp_path: Path, ray_local: Any) -> None:
    audit = {"share": 0.5, "model": "strong", "min_agreement": 0.3}
    (tmp_path / "local").mkdir()
    local_cfg = trust_job(tmp_path / "local", ROWS, quality={"confidence": "logprobs", "audit": audit},
                          prompt={"rows_per_request": 5}, input={"batch_size": 20})
    local = pipeline.run(local_cfg, quiet=True)
    assert local.exit_code == 0, local
    expected = pq.read_table(tmp_path / "local" / "out" / "results.parquet")
    cfg = copy.deepcopy(local_cfg)
    cfg["output"] = {"dir": str(tmp_path / "ray")}
    cfg["run"] = {**cfg["run"], "engine": "ray", "workers": 2}
    s = pipeline.run(cfg, quiet=True)
    assert s.exit_code == 0 and s.succeeded == ROWS, s
    assert s.requests_sent < ROWS and local.requests_sent < ROWS  # packs, never one by one
    got = _ray_results(tmp_path / "ray")
    assert got.schema.remove_metadata() == expected.schema.remove_metadata()
    assert _decisions(got).drop("cost_usd").equals(_decisions(expected).drop("cost_usd"))
    assert set(got.column("cascade_stage").to_pylist()) == {1, 2}
    assert s.quality["audit"] == local.quality["audit"] and s.quality["cascade"] == local.quality["cascade"]
    again = pipeline.run(cfg, quiet=True)
    assert again.exit_code == 0 and again.requests_sent == 0
