"""run.mode: batch end to end against the simulator's Batch API: every row exactly once, the batch price,
line failures through the one classifier, --no-wait and exit 75, status, cancel, retry_via: sync."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.batch import driver
from pipeline.batch.ledger import read_chunks
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.engines.runner import Interrupt, run_async
from pipeline.errors import EXIT_BATCH_SUBMITTED, UnsafePathError
from pipeline.state.store import Store
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.support import TEST_KEY_ENV as KEY_ENV
from tests.support import assert_each_id_once, outputs, sim_job, write_config

FAST = {"poll_interval_s": 0.001, "poll_max_interval_s": 0.01}


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def start_sim(**batch: Any) -> SimulatorThread:
    sim = SimulatorThread(SimConfig(seed=7, log_limit=0, batch=batch))
    sim.start()
    return sim


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[SimulatorThread]:
    thread = start_sim(**getattr(request, "param", {}))
    yield thread
    thread.stop()


def batch_job(tmp_path: Path, sim: SimulatorThread, rows: int, *, batch: dict[str, Any] | None = None,
              **sections: Any) -> dict[str, Any]:
    return sim_job(tmp_path, sim, rows, run={"mode": "batch", "progress": False},
                   batch={**FAST, **(batch or {})}, **sections)


def batch_stats(sim: SimulatorThread) -> dict[str, Any]:
    stats: dict[str, Any] = sim.stats()["batch"]
    return stats


def test_20k_rows_with_failed_lines_and_an_expired_batch_land_once_at_half_price(
        tmp_path: Path, key_env: None) -> None:
    sim = start_sim(line_rate_4xx=0.01, line_rate_5xx=0.01, expire=[2], expire_done_ratio=0.4)
    try:
        cfg = batch_job(tmp_path, sim, 20_000, batch={"max_requests": 6000}, input={"batch_size": 2000})
        summary = pipeline.run(cfg)
        stats = batch_stats(sim)
    finally:
        sim.stop()
    res = assert_each_id_once(tmp_path / "out", 20_000)
    _, fail = outputs(tmp_path / "out")
    # The 4xx lines are permanent failures (status 400, never retried); every 5xx and expired line went
    # into a later batch file and was answered there.
    assert set(fail["error_class"].to_list()) == {"permanent"}
    assert set(fail["status"].to_list()) == {400}
    assert summary.failed == len(fail) and 0 < len(fail) < 20_000 * 0.02
    assert summary.succeeded == len(res) and summary.pending == 0 and summary.exit_code == 1
    assert stats["status"]["expired"] == 1
    resent = stats["lines_submitted"] - 20_000
    assert resent >= 0.6 * 6000 and summary.retries["transient"] == resent
    # One batch per chunk: nothing was submitted twice.
    assert set(stats["created_by_chunk"].values()) == {1}
    assert stats["batches_created"] == len(stats["created_by_chunk"])
    # Half the sync price of the same tokens (gpt-4-turbo: $10 / $30 per million).
    sync_cost = (res["prompt_tokens"].sum() * 10 + res["completion_tokens"].sum() * 30) / 1e6
    assert res["cost_usd"].sum() == pytest.approx(sync_cost / 2, rel=1e-6)
    assert summary.cost_usd == pytest.approx(sync_cost / 2, rel=1e-6)


def test_batch_answers_equal_sync_answers_at_half_the_cost(tmp_path: Path, key_env: None) -> None:
    """The OpenAI flavour reports no cost: the client prices the batch lines at half the table price."""
    sim = SimulatorThread(SimConfig(flavor="openai", seed=3, default_model="gpt-4o-mini",
                                    no_json_schema_models=[]))
    sim.start()
    try:
        base = {"endpoint": {"model": "gpt-4o-mini"}}
        (tmp_path / "b").mkdir()
        (tmp_path / "s").mkdir()
        batch_cfg = batch_job(tmp_path / "b", sim, 60, **base)
        sync_cfg = sim_job(tmp_path / "s", sim, 60, run={"progress": False}, **base)
        assert pipeline.run(batch_cfg).exit_code == 0
        assert pipeline.run(sync_cfg).exit_code == 0
    finally:
        sim.stop()
    b = pl.read_parquet(tmp_path / "b" / "out" / "results.parquet").sort("rid")
    s = pl.read_parquet(tmp_path / "s" / "out" / "results.parquet").sort("rid")
    assert b["content"].to_list() == s["content"].to_list()
    assert b["prompt_tokens"].to_list() == s["prompt_tokens"].to_list()
    for cb, cs in zip(b["cost_usd"].to_list(), s["cost_usd"].to_list()):
        assert cb == pytest.approx(cs / 2, rel=1e-9)


@pytest.mark.parametrize("sim", [{"in_progress_polls": 3}], indirect=True)
def test_no_wait_exits_75_and_the_same_command_collects(tmp_path: Path, sim: SimulatorThread, key_env: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, batch_job(tmp_path, sim, 30, batch={"max_requests": 20}))
    assert main(["run", str(path), "--no-wait", "-q"]) == EXIT_BATCH_SUBMITTED
    err = capsys.readouterr().err
    assert "submitted; run the same command again to collect" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["exit_code"] == 75 and summary["pending"] == 30
    assert main(["status", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "batches    2" in shown and "validating" in shown
    assert batch_stats(sim)["batches_created"] == 2
    assert main(["run", str(path), "-q"]) == 0
    assert batch_stats(sim)["batches_created"] == 2  # collected, not submitted again
    assert_each_id_once(tmp_path / "out", 30)


@pytest.mark.parametrize("sim", [{"in_progress_polls": 1000}], indirect=True)
def test_cancel_batches_cancels_at_the_provider_and_a_rerun_collects_and_resubmits(
        tmp_path: Path, sim: SimulatorThread, key_env: None) -> None:
    cfg = batch_job(tmp_path, sim, 20)
    assert pipeline.run(cfg, no_wait=True).exit_code == EXIT_BATCH_SUBMITTED
    summary = pipeline.run(cfg, cancel_batches=True)
    assert summary.exit_code == 3 and summary.stopped == "batches_cancelled"
    assert batch_stats(sim)["cancels"] == 1
    sim.call(lambda: setattr(sim.sim.batches.cfg, "in_progress_polls", 1))
    assert pipeline.run(cfg).exit_code == 0
    stats = batch_stats(sim)
    assert stats["status"] == {"cancelled": 1, "completed": 1}
    assert_each_id_once(tmp_path / "out", 20)


@pytest.mark.parametrize("sim", [{"line_rate_5xx": 0.2}], indirect=True)
def test_retry_via_sync_sends_the_transient_lines_as_chat_requests(tmp_path: Path, sim: SimulatorThread,
                                                                   key_env: None) -> None:
    summary = pipeline.run(batch_job(tmp_path, sim, 50, batch={"retry_via": "sync"}))
    stats = sim.stats()
    assert summary.exit_code == 0
    resent = stats["batch"]["lines_submitted"] - 50
    assert resent == 0 and stats["batch"]["batches_created"] == 1
    assert stats["requests"] == summary.retries["transient"] > 0  # one chat request per 5xx line
    assert_each_id_once(tmp_path / "out", 50)


@pytest.mark.parametrize("sim", [{"max_enqueued_tokens": 2500}], indirect=True)
def test_the_queue_cap_holds_files_back(tmp_path: Path, sim: SimulatorThread, key_env: None) -> None:
    # ~45 prompt tokens a line: ~40 lines a file under our cap of 2,000. Were two files in flight at once,
    # the provider's queue (2,500) would refuse the second with a 429.
    summary = pipeline.run(batch_job(tmp_path, sim, 120, batch={"max_enqueued_tokens": 2000}))
    stats = batch_stats(sim)
    assert summary.exit_code == 0
    assert stats["batches_created"] >= 3 and set(stats["created_by_chunk"].values()) == {1}
    assert stats.get("create_429", 0) == 0
    assert_each_id_once(tmp_path / "out", 120)


@pytest.mark.parametrize("sim", [{"max_active": 1}], indirect=True)
def test_a_429_on_create_waits_for_running_batches(tmp_path: Path, sim: SimulatorThread, key_env: None) -> None:
    summary = pipeline.run(batch_job(tmp_path, sim, 60, batch={"max_requests": 20}))
    stats = batch_stats(sim)
    assert summary.exit_code == 0
    assert stats["create_429"] > 0  # the provider said "wait", and the file waited for its turn
    assert stats["batches_created"] == 3 and set(stats["created_by_chunk"].values()) == {1}
    assert_each_id_once(tmp_path / "out", 60)


@pytest.mark.parametrize("sim", [{"in_progress_polls": 1000}], indirect=True)
def test_the_budget_counts_submitted_lines_at_their_worst_case(tmp_path: Path, sim: SimulatorThread,
                                                               key_env: None) -> None:
    # Worst case of a line: ~50 prompt tokens * 1.25 at $10/M + 200 output tokens at $30/M = ~$0.0066,
    # half in batch: ~$0.0033; 20 lines a file -> ~$0.066 a file. While the batches run (nothing collected,
    # nothing paid yet), the budget holds the first file and as many lines of the second as fit.
    cfg = batch_job(tmp_path, sim, 40, batch={"max_requests": 20}, budget={"max_cost_usd": 0.1})
    assert pipeline.run(cfg, no_wait=True).exit_code == EXIT_BATCH_SUBMITTED
    store = Store(str(tmp_path / "out" / "store.sqlite"), readonly=True)
    try:
        running = [c for c in read_chunks(store) if c.state == "submitted"]
    finally:
        store.close()
    assert [c.lines for c in running][0] == 20 and 20 < sum(c.lines for c in running) < 40
    assert sum(c.worst_usd for c in running) <= 0.1
    assert batch_stats(sim)["lines_submitted"] == sum(c.lines for c in running)


def test_status_lists_each_batch(tmp_path: Path, key_env: None) -> None:
    sim = start_sim()
    try:
        pipeline.run(batch_job(tmp_path, sim, 10))
    finally:
        sim.stop()
    store = Store(str(tmp_path / "out" / "store.sqlite"), readonly=True)
    try:
        chunks = read_chunks(store)
    finally:
        store.close()
    assert [(c.state, c.status, c.counts.get("completed")) for c in chunks] == [("collected", "completed", 10)]


@pytest.mark.parametrize("sim", [{"line_rate_schema_invalid": 0.3}], indirect=True)
def test_bad_content_lines_go_again_within_the_bad_content_budget(tmp_path: Path, sim: SimulatorThread,
                                                                  key_env: None) -> None:
    summary = pipeline.run(batch_job(tmp_path, sim, 40, structured={"bad_content_retries": 1}))
    res = assert_each_id_once(tmp_path / "out", 40)
    _, fail = outputs(tmp_path / "out")
    stats = batch_stats(sim)
    assert summary.retries["bad_content"] == stats["lines_submitted"] - 40 > 0
    # Two tries each at most (one retry): whatever failed twice is a bad_content failure with its content kept.
    assert set(fail["error_class"].to_list()) <= {"bad_content"}
    assert stats["lines_submitted"] <= 40 + summary.retries["bad_content"] and len(res) > 30


@pytest.mark.parametrize("sim", [{"max_file_lines": 10}], indirect=True)
def test_a_file_the_provider_rejects_stops_the_run_naming_it(tmp_path: Path, sim: SimulatorThread,
                                                             key_env: None) -> None:
    summary = pipeline.run(batch_job(tmp_path, sim, 20))
    assert summary.exit_code == 3 and summary.stopped == "fatal"
    assert "rejected batch file" in (summary.stop_message or "")
    assert "too_many_requests" in (summary.stop_message or "")
    assert summary.pending == 20


@pytest.mark.parametrize("sim", [{"in_progress_polls": 3}], indirect=True)
def test_ctrl_c_leaves_the_batches_running_and_the_same_command_collects(
        tmp_path: Path, sim: SimulatorThread, key_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(batch_job(tmp_path, sim, 20))
    interrupt = Interrupt()
    monkeypatch.setattr(driver, "FAULT_HOOK", lambda step: interrupt.trigger() if step == "polling" else None)
    summary = asyncio.run(run_async(cfg, interrupt=interrupt))
    assert summary.exit_code == 130 and "keep running at the provider" in (summary.next_step or "")
    assert batch_stats(sim)["status"] == {"validating": 1}  # not cancelled
    monkeypatch.setattr(driver, "FAULT_HOOK", None)
    assert pipeline.run(cfg).exit_code == 0
    assert batch_stats(sim)["batches_created"] == 1
    assert_each_id_once(tmp_path / "out", 20)


def test_batch_mode_refuses_streaming_and_the_ray_engine(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from tests.conftest import job
    with pytest.raises(ConfigError, match="params.stream"):
        load_config(job(tmp_path, 1, run={"mode": "batch"}, params={"stream": True}))
    with pytest.raises(ConfigError, match="run.engine"):
        load_config(job(tmp_path, 1, run={"mode": "batch", "engine": "ray"}))


def test_no_wait_refuses_the_in_process_simulator(tmp_path: Path) -> None:
    from pipeline.errors import UsageError
    from tests.conftest import job
    with pytest.raises(UsageError, match="pipeline simulate"):
        pipeline.run(job(tmp_path, 5, run={"mode": "batch", "progress": False}), no_wait=True)
    assert not (tmp_path / "out" / "batch").exists()  # nothing was written or sent


def test_an_endpoint_without_the_batch_api_stops_the_run_saying_so(tmp_path: Path, sim: SimulatorThread,
                                                                    key_env: None) -> None:
    cfg = batch_job(tmp_path, sim, 5)
    cfg["endpoint"]["base_url"] = f"{sim.base_url}/no-batches-here"
    summary = pipeline.run(cfg)
    assert summary.exit_code == 3 and summary.pending == 5
    assert "refused batch file" in (summary.stop_message or "") and "HTTP 404" in (summary.stop_message or "")


@pytest.mark.parametrize("sim", [{"line_rate_4xx": 1.0, "line_4xx_status": 401}], indirect=True)
def test_a_401_line_stops_the_run(tmp_path: Path, sim: SimulatorThread, key_env: None) -> None:
    summary = pipeline.run(batch_job(tmp_path, sim, 5))
    assert summary.exit_code == 3 and summary.stopped == "fatal" and summary.pending == 5
    assert "401" in (summary.stop_message or "")


def test_batch_files_are_never_written_through_links(tmp_path: Path, sim: SimulatorThread, key_env: None) -> None:
    # A shared output folder: a link planted where the batch files go is refused, its target left alone.
    victim = tmp_path / "victim"
    victim.mkdir()
    cfg = batch_job(tmp_path, sim, 20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "batch").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="never writes through links"):  # exit 2 through the CLI
        pipeline.run(cfg)
    assert list(victim.iterdir()) == [] and batch_stats(sim).get("files_uploaded", 0) == 0
