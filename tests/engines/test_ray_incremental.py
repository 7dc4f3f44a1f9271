"""Issue 23 on the real local Ray instance and the loopback S3 server: the Ray engine is incremental
(the local engine's job identity and batch digests, shards named by content, answers found across
shards through the row map), operable (history.jsonl, pipeline.log with the workers' events, status),
and has one budget and one driver per job."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import StoreLockedError
from pipeline.read import storage
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import SCHEMA


def _rows(ids: range, edited: set[int] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    return [{"rid": f"r{i:04d}", "text": f"review {i}: {'EDITED ' if i in edited else ''}works fine"} for i in ids]


def _put_jsonl(uri: str, rows: list[dict[str, Any]]) -> None:
    storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _ids(folder: str) -> list[str]:
    out: list[str] = []
    for uri in storage.list_files(folder):
        fs, path = storage.filesystem(uri)
        out += pq.read_table(path, filesystem=fs, columns=["rid"])["rid"].to_pylist()
    return out


def _cfg(bucket: str, url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": f"{bucket}/in/rows.jsonl", "id_column": "rid", "batch_size": 25},
        "endpoint": {"base_url": url, "model": "openai/gpt-4-turbo", "api_key_env": "SIM_KEY"},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 50},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "max_concurrency": 16, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "output": {"dir": f"{bucket}/job"},
        # Two workers: shards still run side by side; each more is one more Ray process to start per run.
        "run": {"engine": "ray", "workers": 2, "progress": False},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture
def sim() -> Any:
    os.environ["SIM_KEY"] = "sk-test"
    s = SimulatorThread(SimConfig(seed=5))
    url = s.start()
    yield s, url
    s.stop()
    os.environ.pop("SIM_KEY", None)


def test_three_nights_over_a_growing_input_send_only_what_has_no_answer(s3_bucket: str, ray_local: Any,
                                                                      sim: Any) -> None:
    server, url = sim
    cfg = _cfg(s3_bucket, url)
    data, out = f"{s3_bucket}/in/rows.jsonl", f"{s3_bucket}/job"
    # 4, 5, then 6 shards of 25 rows; on the third night 5 rows go (every later row moves to another shard,
    # its answer found through the row map), 10 are edited and 25 are new.
    nights = [
        _rows(range(100)),
        _rows(range(125)),
        [r for r in _rows(range(150), edited=set(range(50, 60))) if int(r["rid"][1:]) not in range(20, 25)],
    ]
    sent_before = 0
    for night, (rows, expect) in enumerate(zip(nights, (100, 25, 35)), 1):
        _put_jsonl(data, rows)
        summary = pipeline.run(cfg, quiet=True)
        sent = server.stats()["requests"] - sent_before
        sent_before += sent
        assert (night, sent, summary.requests_sent) == (night, expect, expect), summary
        assert summary.exit_code == 0 and summary.succeeded == len(rows), summary
        assert sorted(_ids(f"{out}/results.parquet")) == sorted(r["rid"] for r in rows)  # exactly this input
    assert (summary.rows_removed, summary.rows_new, summary.rows_edited, summary.rows_reused) == (5, 25, 10, 110)
    history = storage.read_bytes(f"{out}/history.jsonl").decode().splitlines()
    assert [json.loads(line)["requests"] for line in history] == [100, 25, 35]
    log = [json.loads(line) for line in storage.read_bytes(f"{out}/pipeline.log").decode().splitlines()]
    assert [e["event"] for e in log].count("run_start") == 3 and any(e["event"] == "run_end" for e in log)
    from pipeline.reporting.status import job_status
    st = job_status(out)
    assert (st["engine"], st["state"], st["rows_done"], st["shards_done"]) == ("ray", "finished", 145, st["shards_total"])


def test_workers_events_reach_the_one_log(tmp_path: Path, ray_local: Any) -> None:
    from tests.conftest import job
    from tests.ops.test_ops import Receiver
    with Receiver() as hook:
        cfg = job(tmp_path, rows=20, input={"batch_size": 10}, run={"engine": "ray", "workers": 2},
                  sim={"fault_plan": [{"requests": "1-3", "fault": "500"}]},
                  output={"metrics_file": str(tmp_path / "pipeline.prom")},
                  notify={"webhook": hook.url, "on": ["success", "failure"]})
        summary = pipeline.run(cfg, quiet=True)
    posted = [json.loads(b) for b in hook.bodies]
    assert [(p["engine"], p["exit_code"], p["job"], p["requests"]) for p in posted] == [
        ("ray", 0, str(tmp_path / "out"), 23)]
    assert re.search(r"^pipeline_run_exit_code\{[^}]*\} 0(\.0)?$", (tmp_path / "pipeline.prom").read_text(), re.M)
    assert summary.exit_code == 0 and summary.retries.get("transient") == 3, summary
    events = [json.loads(line) for line in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "attempt_failed"]
    assert len(failed) == 3 and all(e["status"] == 500 for e in failed)  # logged in the workers
    assert [json.loads(line)["exit_code"] for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()] == [0]
    df = pipeline.load(str(tmp_path / "out"))
    assert df.height == 20 and "sentiment" in df.columns
    # One outcome policy and one record construction (issue 23, item 5): the workers run the local
    # engine's dispatcher, so the same job gives the same columns, types and answers on both engines.
    local = pipeline.run({**cfg, "run": {"engine": "local", "progress": False}, "notify": {},
                          "output": {"dir": str(tmp_path / "local")}}, quiet=True)
    assert local.retries == summary.retries
    here = pipeline.load(str(tmp_path / "local"))
    assert here.schema == df.schema
    keys = ["rid", "request_key", "sentiment", "score", "finish_reason", "prompt_tokens"]
    assert here.sort("rid").select(keys).equals(df.sort("rid").select(keys))
    from pipeline.reporting.data import load_run
    from pipeline.reporting.html import fragment
    from pipeline.reporting.show import row_story
    run = load_run(tmp_path / "out")
    assert run.results.height == 20 and run.timings.height == 20 and run.model == "openai/gpt-4-turbo"
    assert "attempt" in fragment([run], None) or run.events  # the report renders from a Ray folder
    import yaml
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    story = row_story(str(tmp_path / "out"), "r000003", config=str(tmp_path / "job.yaml"))
    assert story.outcome == "succeeded" and story.request and story.request["verified"], story.request
    assert story.record and story.record["key"] == story.row["request_key"]


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(s3_bucket: str) -> None:
    from pipeline.engines.ray.lease import LEASE_S, Lease
    now = [1_000_000.0]
    first = Lease(f"{s3_bucket}/job", run_id="first", clock=lambda: now[0])
    first.acquire()
    second = Lease(f"{s3_bucket}/job", run_id="second", clock=lambda: now[0])
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on .*run first"):
        second.acquire()
    now[0] += LEASE_S / 2
    assert first.renew()                  # the holder extends it
    now[0] += LEASE_S * 0.9
    with pytest.raises(StoreLockedError):  # still held: renewed half a lease ago
        second.acquire()
    now[0] += LEASE_S                      # the first driver died: no renewal, the lease expires
    second.acquire()
    assert not first.renew() and first.lost and "was taken over" in first.lost
    second.release()
    third = Lease(f"{s3_bucket}/job", run_id="third", clock=lambda: now[0])
    third.acquire()                        # released: admitted at once


def test_label_takes_a_job_file_without_an_input_section(tmp_path: Path, ray_local: Any) -> None:
    import pyarrow as pa
    import yaml

    import pipeline.ray as pray
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "endpoint": {"base_url": "simulator"}, "prompt": {"user": "{{ text }}"}, "structured": {"schema": SCHEMA},
        "limits": {"max_concurrency": 4}, "output": {"dir": str(tmp_path / "label")},
        "run": {"workers": 2, "progress": False}}))
    rows = [{"text": f"review {i}: fine"} for i in range(6)]
    table = pa.concat_tables(ray_local.get(pray.label(ray_local.data.from_items(rows), str(job_file)).to_arrow_refs()))
    assert table.num_rows == 6 and table.column("error_class").to_pylist() == [None] * 6
