"""Cascades and the audit gate on run.engine: ray (real local Ray, simulator with per-model accuracy): the
same decisions, columns and quality figures as the local engine on the same rows; a failing gate exits 4
and publishes nothing; the re-run answers every stage from the journal and publishes once the gate holds."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline.read import storage
from tests.e2e.test_cascade import trust_job
from tests.ops.test_ops import Receiver
from tests.support import cli_in_process, write_config

ROWS = 60
AUDIT = {"share": 0.5, "model": "strong", "min_agreement": 0.995}


def _ray_results(out: Path) -> pa.Table:
    parts = sorted((out / "results.parquet").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _keys(folder: Path) -> set[str]:
    return {k for seg in folder.glob("*.parquet") for k in pq.read_table(seg, columns=["key"])["key"].to_pylist()}


def _decisions(table: pa.Table) -> pl.DataFrame:
    cols = ["rid", "output", "model", "cascade_stage", "confidence", "confidence_by_field", "audit_agrees",
            "request_key", "cost_usd"]
    return pl.from_arrow(table.select(cols)).sort("rid")  # type: ignore[return-value]


def test_a_cascade_on_ray_decides_as_the_local_engine_and_its_gate_holds_back_the_outputs(
        tmp_path: Path, ray_local: Any, s3_bucket: str) -> None:
    (tmp_path / "local").mkdir()
    local_cfg = trust_job(tmp_path / "local", ROWS, quality={"confidence": "logprobs", "audit": AUDIT})
    local = pipeline.run(local_cfg, quiet=True)
    assert local.exit_code == 4
    expected = pq.read_table(tmp_path / "local" / "out" / "results.parquet")

    cfg = copy.deepcopy(local_cfg)
    cfg["input"] = {**cfg["input"], "batch_size": 20}  # three shards
    cfg["output"] = {"dir": str(tmp_path / "ray"), "publish": f"{s3_bucket}/published"}
    cfg["run"] = {**cfg["run"], "engine": "ray", "workers": 2}
    with Receiver() as hook:
        cfg["notify"] = {"webhook": hook.url}
        s = pipeline.run(cfg, quiet=True)
    # The gate: exit 4, everything written in output.dir, nothing published, the webhook says why.
    assert s.exit_code == 4 and s.stopped == "quality_gate" and s.succeeded == ROWS, s
    assert storage.list_files(f"{s3_bucket}/published") == []
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["exit_code"] == 4 and summary["quality"]["gate"] == "failed"
    assert summary["quality"]["published"] is False and "min_agreement 0.995" in summary["stop_message"]
    payload = orjson.loads(hook.bodies[-1])
    assert payload["exit_code"] == 4 and payload["stop_reason"] == "quality_gate"
    assert "quality gate failed" in payload["message"]
    # The same rows, the same decisions, the same columns (types included) as the local engine; the same
    # agreement per field with its interval, the same rows per stage.
    got = _ray_results(tmp_path / "ray")
    assert got.schema.remove_metadata() == expected.schema.remove_metadata()
    assert _decisions(got).equals(_decisions(expected))
    assert set(got.column("cascade_stage").to_pylist()) == {1, 2}
    assert summary["quality"]["audit"] == local.quality["audit"]
    assert summary["quality"]["cascade"] == local.quality["cascade"]
    history = [json.loads(line) for line in (tmp_path / "ray" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["quality"]["gate"] == "failed"
    # The dry run reads the Ray job's journal as it reads a local job's store: nothing left to send, and
    # the cascade's likely case from the first stage's answers.
    path = write_config(tmp_path, cfg)
    dry = json.loads(cli_in_process("run", str(path), "--dry-run", "--json").stdout)
    assert dry["requests"] == 0 and dry["rows"]["done_ok"] == ROWS, dry
    assert f"go on (of {ROWS} first-stage answers in this job)" in cli_in_process("run", str(path), "--dry-run").stdout

    # A lower bar: every stage's and the audit's answers come from the journal (nothing is paid twice),
    # the gate holds, and the parts and then the summary are published.
    cfg["quality"]["audit"]["min_agreement"] = 0.3
    again = pipeline.run(cfg, quiet=True)
    assert again.exit_code == 0 and again.requests_sent == 0 and again.quality["gate"] == "passed", again
    # The gate's bar is part of the parts' layout, so every shard has a new name and took its answers from
    # the old shards' folders: each copied every answer its rows used (each stage's and the audit's), not
    # only the deciding ones, so the shards of this plan hold every answer the job has.
    shards = json.loads((tmp_path / "ray" / "ray-manifest.json").read_text())["shards"]
    folders = {p.name: _keys(p) for p in (tmp_path / "ray" / "_journal").iterdir() if p.is_dir()}
    assert set(shards) <= set(folders) and len(folders) == 2 * len(shards)
    assert set().union(*(folders[n] for n in shards)) == set().union(*folders.values())
    published = storage.list_files(f"{s3_bucket}/published")
    assert sum("/results.parquet/part-" in u for u in published) == 3
    assert sum("/failures.parquet/part-" in u for u in published) == 3 and published[-1].endswith("summary.json")


def test_the_dry_run_of_a_ray_cascade_prices_every_stage_as_the_local_one(tmp_path: Path) -> None:
    cfg = trust_job(tmp_path, 30, quality={"confidence": "logprobs", "audit": {"share": 0.5, "model": "strong"}})
    local = json.loads(cli_in_process("run", str(write_config(tmp_path, cfg)), "--dry-run", "--json").stdout)
    cfg["run"] = {**cfg["run"], "engine": "ray", "workers": 2}
    ray = json.loads(cli_in_process("run", str(write_config(tmp_path, cfg)), "--dry-run", "--json").stdout)
    assert ray["cost_usd"] == local["cost_usd"] and ray["cost_usd"]["max"] > 0
