"""Batch mode that always finishes (issue 23 item 4, issue 19 items 4 and 7): recovery against a Batch API
server without `GET /files`, a files endpoint that always fails, --no-wait only with a batch running, the
budget per line, the provider's files deleted after collection, every line in the log and the metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from pipeline.batch import driver
from pipeline.cli import main
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.batch.test_batch import batch_job, batch_stats
from tests.batch.test_batch_kill import Killed, kill_at
from tests.support import TEST_KEY_ENV as KEY_ENV
from tests.support import assert_each_id_once, write_config


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def serve(**batch: Any) -> SimulatorThread:
    sim = SimulatorThread(SimConfig(seed=11, log_limit=0, batch=batch))
    sim.start()
    return sim


class Naps:
    """The driver's waits on a virtual clock: recorded, never slept."""

    def __init__(self) -> None:
        self.total = 0.0

    async def __call__(self, seconds: float) -> None:
        self.total += seconds


@pytest.mark.parametrize("step", ["uploaded", "created"])
def test_killed_between_upload_and_create_without_a_files_list_finishes_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    sim = serve(list_files=False)
    try:
        cfg = batch_job(tmp_path, sim, 60, batch={"max_requests": 20})
        monkeypatch.setattr(driver, "FAULT_HOOK", kill_at(step, 2, tmp_path / "out"))
        with pytest.raises(Killed):
            pipeline.run(cfg)
        monkeypatch.setattr(driver, "FAULT_HOOK", None)
        summary = pipeline.run(cfg)
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 0
    assert stats["batches_created"] == 3 and set(stats["created_by_chunk"].values()) == {1}  # none twice
    assert stats["lines_submitted"] == 60
    if step == "uploaded":  # the upload the kill hid cannot be found without GET /files: uploaded again
        assert stats["files_list_refused"] == 1 and stats["upload_attempts"] == 4
    assert_each_id_once(tmp_path / "out", 60)


def test_a_create_that_cannot_be_settled_stops_with_3_and_force_new_gets_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sim = serve(list_files=False, list_batches=False)
    try:
        cfg = batch_job(tmp_path, sim, 20)
        path = write_config(tmp_path, cfg)
        monkeypatch.setattr(driver, "FAULT_HOOK", kill_at("created", 1, tmp_path / "out"))
        with pytest.raises(Killed):
            pipeline.run(cfg)
        monkeypatch.setattr(driver, "FAULT_HOOK", None)
        assert main(["run", str(path), "-q"]) == 3  # never 2: something was sent
        err = capsys.readouterr().err
        assert "GET /batches answered HTTP 405" in err and "--force-new" in err and "pipeline_chunk=1" in err
        assert batch_stats(sim)["batches_created"] == 1  # nothing created again on a guess
        assert main(["run", str(path), "-q", "--force-new"]) == 0
    finally:
        sim.stop()
    assert_each_id_once(tmp_path / "out", 20)


def test_post_files_always_500_stops_with_3_naming_the_call_in_bounded_attempts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    naps = Naps()
    monkeypatch.setattr(driver, "NAP", naps)
    sim = serve(upload_status=500)
    try:
        # The default poll intervals (60 s .. 600 s): only the virtual clock makes this test fast.
        cfg = batch_job(tmp_path, sim, 10, batch={"poll_interval_s": 60, "poll_max_interval_s": 600},
                        limits={"max_retries": 3})
        summary = pipeline.run(cfg)
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 3 and summary.stopped == "fatal" and summary.pending == 10
    message = summary.stop_message or ""
    assert "POST /files answered HTTP 500" in message and "stopped answering" in message
    assert stats["upload_attempts"] == 4  # the first try and limits.max_retries more, then it gives up
    assert 0 < naps.total <= 3 * 60  # backed off between tries (limits.backoff_max_s caps each wait)
    log = [json.loads(x) for x in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    failed = [e for e in log if e["event"] == "batch_call_failed"]
    assert [e["attempt"] for e in failed] == [1, 2, 3, 4] and {e["status"] for e in failed} == {500}


def test_no_wait_exits_75_only_when_a_batch_is_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(driver, "NAP", Naps())
    sim = serve(upload_status=500)
    try:
        path = write_config(tmp_path, batch_job(tmp_path, sim, 10, limits={"max_retries": 2}))
        assert main(["run", str(path), "--no-wait", "-q"]) == 3  # nothing was uploaded: not "submitted"
        assert "POST /files answered HTTP 500" in capsys.readouterr().err
        sim.call(lambda: setattr(sim.sim.batches.cfg, "upload_status", None))
        sim.call(lambda: setattr(sim.sim.batches.cfg, "in_progress_polls", 1000))
        assert main(["run", str(path), "--no-wait", "-q"]) == 75  # now a batch is running
    finally:
        sim.stop()


def test_the_budget_reserves_per_line_and_finishes_in_one_run(tmp_path: Path) -> None:
    # A line's worst case is ~$0.0033 (200 output tokens at half of $30/M); what it costs is a fifth of that.
    # A $0.03 cap holds 9 lines at their worst: the rest go as earlier lines are collected and paid for.
    sim = serve()
    try:
        summary = pipeline.run(batch_job(tmp_path, sim, 30, budget={"max_cost_usd": 0.03}))
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 0 and summary.pending == 0
    assert summary.cost_usd <= 0.03
    assert stats["batches_created"] > 1 and stats["lines_submitted"] == 30  # split to fit, no line twice
    assert_each_id_once(tmp_path / "out", 30)


def test_the_budget_stops_when_not_one_more_line_fits(tmp_path: Path) -> None:
    sim = serve()
    try:
        cfg = batch_job(tmp_path, sim, 40, budget={"max_cost_usd": 0.008})
        summary = pipeline.run(cfg)
        submitted = batch_stats(sim)["lines_submitted"]
        assert summary.exit_code == 3 and summary.stopped == "budget"
        assert "budget.max_cost_usd" in (summary.stop_message or "")
        assert 0 < summary.cost_usd <= 0.008 and 0 < submitted < 40
        # A raised budget goes on from there: every line once.
        assert pipeline.run({**cfg, "budget": {"max_cost_usd": 1}}).exit_code == 0
        assert batch_stats(sim)["lines_submitted"] == 40
    finally:
        sim.stop()
    assert_each_id_once(tmp_path / "out", 40)


def test_files_are_deleted_at_the_provider_once_collected(tmp_path: Path) -> None:
    sim = serve(line_rate_4xx=0.2)  # an error file too
    try:
        summary = pipeline.run(batch_job(tmp_path, sim, 40, batch={"max_requests": 20}))
        stats = batch_stats(sim)
        left = sim.call(lambda: sorted(sim.sim.batches.files))
    finally:
        sim.stop()
    assert summary.exit_code == 1
    assert left == [] and stats["files_deleted"] == stats["files_uploaded"] + 4  # inputs, outputs, errors


def test_delete_files_false_keeps_them(tmp_path: Path) -> None:
    sim = serve()
    try:
        pipeline.run(batch_job(tmp_path, sim, 10, batch={"delete_files": False}))
        stats = batch_stats(sim)
        left = sim.call(lambda: len(sim.sim.batches.files))
    finally:
        sim.stop()
    assert stats.get("files_deleted", 0) == 0 and left == 2


def test_every_line_lands_in_the_log_and_the_metrics(tmp_path: Path) -> None:
    prom = tmp_path / "pipeline.prom"
    sim = serve(line_rate_5xx=0.2, line_rate_4xx=0.1)
    try:
        summary = pipeline.run(batch_job(tmp_path, sim, 50, output={"metrics_file": str(prom)}))
        stats = batch_stats(sim)
    finally:
        sim.stop()
    samples = {(x.name, x.labels.get("status_class")): x.value
               for fam in text_string_to_metric_families(prom.read_text()) for x in fam.samples}
    assert samples[("pipeline_requests_total", "2xx")] == summary.succeeded
    assert samples[("pipeline_requests_total", "4xx")] == summary.failed > 0
    assert samples[("pipeline_requests_total", "5xx")] == summary.retries["transient"] > 0
    assert sum(v for (name, _), v in samples.items() if name == "pipeline_requests_total") == stats["lines_submitted"]
    log = [json.loads(x) for x in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    failed = [e for e in log if e["event"] == "attempt_failed"]
    assert len(failed) == summary.failed + summary.retries["transient"]
    assert {e["status"] for e in failed} == {400, 500}


def test_a_length_answer_is_sent_again_with_the_raised_max_tokens(tmp_path: Path) -> None:
    sim = serve()
    try:
        cfg = batch_job(tmp_path, sim, 10, params={"max_tokens": 3}, structured={"length_max_tokens": 400})
        summary = pipeline.run(cfg)
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 0 and summary.retries["bad_content"] == 10
    assert stats["lines_submitted"] == 20 and stats["batches_created"] == 2

