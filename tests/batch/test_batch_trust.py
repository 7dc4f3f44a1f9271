"""Cascades, the audit and votes as requests in run.mode: batch, on the simulator's Batch API with per-model
accuracy and calibrated logprobs: the same decisions as sync mode, a stage per round of files of its own
model, each line at its model's batch price, a kill in stage 2 resumed with nothing paid twice, the gate."""
from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.batch import driver
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.batch.test_batch import batch_stats
from tests.batch.test_batch_kill import Killed, kill_at
from tests.e2e.test_cascade import ACCURACY, PRICES, SCHEMA
from tests.support import (
    TEST_KEY_ENV,
    assert_each_id_once,
    cli_in_process,
    sim_job,
    start,
    store_query,
    wait_for,
    write_config,
)

CASCADE = [{"model": "weak", "min_confidence": 0.9}, {"model": "strong"}]
INSTANT = {"validating_polls": 0, "in_progress_polls": 0, "finalizing_polls": 0}


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorThread]:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, prices=PRICES, log_limit=0, batch=INSTANT))
    thread.start()
    yield thread
    thread.stop()


def trust_job(tmp_path: Path, sim: SimulatorThread, rows: int, mode: str, **sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"structured": {"schema": SCHEMA, "mode": "json_schema"}, "prices": PRICES,
                            "quality": {"confidence": "logprobs"}, "cascade": CASCADE,
                            "run": {"mode": mode, "progress": False},
                            "batch": {"poll_interval_s": 0.001, "poll_max_interval_s": 0.01, "max_requests": 40}}
    cfg = sim_job(tmp_path, sim, rows, **{**base, **sections})
    cfg["params"] = {"max_tokens": 100}
    return cfg


def chunks(out: Path) -> list[tuple[int, str | None, str, int]]:
    """(chunk, model, state, lines) of the job's batch files, in order."""
    return store_query(out, "SELECT chunk, model, state, lines FROM batch_chunks ORDER BY chunk")


def worst_per_line(out: Path) -> dict[str, float]:
    """{model: the budget's worst case of one line} over the job's batch files."""
    return dict(store_query(out, "SELECT model, sum(worst_usd) / sum(lines) FROM batch_chunks GROUP BY model"))


def stored(out: Path) -> dict[str, str]:
    """{request key: model} of every answer in the job's store."""
    return dict(store_query(out, "SELECT key, model FROM responses"))


def kill_as_stage_2_is_created_then_resume(cfg: dict[str, Any], out: Path, first: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the run right after the provider created the first strong batch, before the ledger recorded it
    (the `first` batch files before it all weak), then resume it to exit 0."""
    monkeypatch.setattr(driver, "FAULT_HOOK", kill_at("created", first + 1, out))
    with pytest.raises(Killed):
        pipeline.run(cfg)
    monkeypatch.setattr(driver, "FAULT_HOOK", None)
    at_kill = chunks(out)
    assert [m for _, m, _, _ in at_kill[:first]] == ["weak"] * first
    assert at_kill[first][1:3] == ("strong", "creating")
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0, summary.stop_message


def runs(tmp_path: Path, sim: SimulatorThread, rows: int, **sections: Any) -> dict[str, Any]:
    """The same job in sync mode then in batch mode (two folders, one simulator): summaries and results."""
    out: dict[str, Any] = {}
    for mode in ("sync", "batch"):
        (tmp_path / mode).mkdir()
        summary = pipeline.run(trust_job(tmp_path / mode, sim, rows, mode, **sections), quiet=True)
        assert summary.exit_code == 0, summary.stop_message
        out[mode] = (summary, assert_each_id_once(tmp_path / mode / "out", rows).sort("rid"))
    return out


def test_a_cascade_in_batch_mode_decides_every_row_as_sync_mode_does(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = 120
    both = runs(tmp_path, sim, rows)
    (s_sync, sync), (s_batch, batch) = both["sync"], both["batch"]
    for column in ("output", "model", "cascade_stage", "confidence", "confidence_by_field", "request_key"):
        assert sync[column].to_list() == batch[column].to_list(), column
    assert set(batch["cascade_stage"]) == {1, 2}
    # Each line at its own model's batch price (half the sync price here): a row decided in stage 2 paid
    # for the weak and the strong answer, both halved.
    assert batch["cost_usd"].to_list() == pytest.approx([c / 2 for c in sync["cost_usd"]], rel=1e-6)
    assert s_batch.cost_usd == pytest.approx(s_sync.cost_usd / 2, rel=1e-6)
    assert s_batch.requests_sent == s_sync.requests_sent == len(stored(tmp_path / "batch" / "out"))
    assert s_batch.quality["cascade"] == s_sync.quality["cascade"]
    # Stage 1's files carry the weak model only, stage 2's the strong one, in a later round.
    files = chunks(tmp_path / "batch" / "out")
    models = [m for _, m, _, _ in files]
    assert models == ["weak"] * 3 + ["strong"] * (len(models) - 3) and "strong" in models
    assert sum(n for _, m, _, n in files if m == "strong") == (batch["cascade_stage"] == 2).sum()
    # The budget holds each line at its own model's worst case (gpt-4o's is ~16x gpt-4o-mini's here).
    worst = worst_per_line(tmp_path / "batch" / "out")
    assert worst["strong"] > 10 * worst["weak"] > 0
    served = sim.stats()["served_by_body"]
    assert set(served.values()) == {2}  # every request once in each mode: the same bodies
    again = pipeline.run(trust_job(tmp_path / "batch", sim, rows, "batch"), quiet=True)
    assert again.exit_code == 0 and again.requests_sent == 0


def test_failed_first_stage_lines_go_on_to_the_next_stage_in_batch_files_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    faults = {**INSTANT, "line_rate_4xx": 0.1, "line_rate_5xx": 0.05}
    sim = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, prices=PRICES, log_limit=0, batch=faults))
    sim.start()
    try:
        rows = 100
        cfg = trust_job(tmp_path, sim, rows, "batch")
        cfg["limits"]["max_retries"] = 0  # a 5xx line is final at once: a transient failure that goes on too
        s = pipeline.run(cfg, quiet=True)
        chat_requests = sim.stats()["requests"]
    finally:
        sim.stop()
    assert s.exit_code in (0, 1)
    res = assert_each_id_once(tmp_path / "out", rows)
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet")
    weak = store_query(tmp_path / "out", "SELECT r.state, r.confidence FROM responses r WHERE r.key IN (SELECT "
                       "l.key FROM batch_lines l JOIN batch_chunks c USING (chunk) WHERE c.model = 'weak')")
    assert len(weak) == rows
    failed_weak = sum(1 for state, _ in weak if state != "ok")
    assert {"transient", "permanent"} <= {state for state, _ in weak}
    onward = sum(1 for state, conf in weak if state != "ok" or conf is None or conf < 0.9)
    assert failed_weak > 0
    # Every row the weak model failed or was unsure of went on; only the last stage's failures are failures.
    assert (res["cascade_stage"] == 2).sum() + fail.height == onward
    assert chat_requests == 0  # the engine pass sent nothing synchronously: every stage went in batch files


def test_kill_in_the_second_stage_resumes_each_id_once_and_pays_no_line_twice(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, per_file = 100, 20
    cfg = trust_job(tmp_path, sim, rows, "batch", batch={"poll_interval_s": 0.001, "poll_max_interval_s": 0.01,
                                                         "max_requests": per_file})
    kill_as_stage_2_is_created_then_resume(cfg, tmp_path / "out", rows // per_file, monkeypatch)
    res = assert_each_id_once(tmp_path / "out", rows)
    stats = batch_stats(sim)
    served = sim.stats()["served_by_body"]
    answers = stored(tmp_path / "out")
    assert list(answers.values()).count("weak") == rows
    assert len(served) == len(answers) and set(served.values()) == {1}  # no line answered twice
    assert stats["lines_submitted"] == len(answers)  # nor submitted twice
    assert set(stats["created_by_chunk"].values()) == {1}  # the batch the kill hid was adopted, not made again
    assert set(res["cascade_stage"]) == {1, 2}


def test_a_failing_audit_gate_in_batch_mode_exits_4_and_publishes_nothing(
        tmp_path: Path, sim: SimulatorThread, s3_bucket: str) -> None:
    rows = 80
    audit = {"share": 0.5, "model": "strong", "min_agreement": 0.995}
    cfg = trust_job(tmp_path, sim, rows, "batch", quality={"confidence": "logprobs", "audit": audit},
                    output={"publish": f"{s3_bucket}/published"})
    s = pipeline.run(cfg, quiet=True)
    assert s.exit_code == 4 and s.stop_message is not None
    from pipeline.read import storage
    assert storage.list_files(f"{s3_bucket}/published") == []
    out = tmp_path / "out"
    res = assert_each_id_once(out, rows)
    audited = res.filter(pl.col("audit_agrees").is_not_null())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 4 and summary["stopped"] == "quality_gate" and summary["quality"]["gate"] == "failed"
    assert summary["quality"]["audit"]["fields"]["sentiment"]["rows"] == audited.height > 20
    # The audit's strong requests went with the first stage's files (one input batch: files 1-2 weak, 3 the
    # audit), not a round later; the escalations' strong file came next and left out the rows the audit had
    # asked already (the same request: one answer serves both).
    files = chunks(out)
    assert [(c, m, n) for c, m, _, n in files[:3]] == [(1, "weak", 40), (2, "weak", 40), (3, "strong", audited.height)]
    later = [n for c, m, _, n in files[3:] if m == "strong"]
    escalated_only = res.filter((pl.col("cascade_stage") == 2) & pl.col("audit_agrees").is_null()).height
    assert len(files) > 3 and sum(later) == escalated_only > 0
    # The same answers, a gate that holds: published, nothing sent.
    cfg["quality"]["audit"]["min_agreement"] = 0.3
    again = pipeline.run(cfg, quiet=True)
    assert again.exit_code == 0 and again.requests_sent == 0
    assert len(storage.list_files(f"{s3_bucket}/published")) == 3


def test_votes_as_requests_in_batch_mode_match_sync(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = 30
    quality = {"confidence": "votes", "votes": 3, "vote_by": "requests"}
    both = runs(tmp_path, sim, rows, quality=quality, cascade=None, endpoint={"model": "weak"})
    (s_sync, sync), (s_batch, batch) = both["sync"], both["batch"]
    assert s_batch.requests_sent == s_sync.requests_sent == 3 * rows
    assert sync["confidence"].to_list() == batch["confidence"].to_list() and batch["confidence"].min() < 1.0
    assert sync["output"].to_list() == batch["output"].to_list()


def test_the_dry_run_of_a_batch_cascade_prices_every_stage_at_batch_rates(tmp_path: Path, sim: SimulatorThread) -> None:
    audit = {"share": 0.5, "model": "auditor"}
    prices = {**PRICES, "auditor": {"input_per_m": 1.0, "output_per_m": 1.0}}
    figures = {}
    for mode in ("sync", "batch"):
        (tmp_path / mode).mkdir()
        cfg = trust_job(tmp_path / mode, sim, 40, mode, prices=prices,
                        quality={"confidence": "logprobs", "audit": audit})
        path = write_config(tmp_path / mode, cfg)
        figures[mode] = json.loads(cli_in_process("run", str(path), "--dry-run", "--json").stdout)
    assert figures["batch"]["cost_usd"]["max"] == pytest.approx(figures["sync"]["cost_usd"]["max"] / 2, rel=1e-6)
    text = cli_in_process("run", str(path), "--dry-run").stdout
    assert "48h00m" in text and "one window per cascade stage (2" in text


def test_no_wait_submits_one_stage_a_run_until_every_row_is_decided(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = 60
    cfg = trust_job(tmp_path, sim, rows, "batch")
    first = pipeline.run(cfg, quiet=True, no_wait=True)
    assert first.exit_code == 75 and {m for _, m, _, _ in chunks(tmp_path / "out")} == {"weak"}
    second = pipeline.run(cfg, quiet=True, no_wait=True)  # stage 1 collected, stage 2 submitted
    assert second.exit_code == 75 and chunks(tmp_path / "out")[-1][1:3] == ("strong", "submitted")
    status = cli_in_process("status", str(tmp_path / "out")).stdout
    assert "(collected) weak" in status and "(submitted) strong" in status, status
    third = pipeline.run(cfg, quiet=True, no_wait=True)
    assert third.exit_code == 0 and third.requests_sent == 0
    res = assert_each_id_once(tmp_path / "out", rows)
    assert set(res["cascade_stage"]) == {1, 2}


def test_kill_9_while_the_second_stage_runs_at_the_provider(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = 60
    cfg = trust_job(tmp_path, sim, rows, "batch", batch={"poll_interval_s": 0.05, "poll_max_interval_s": 0.05,
                                                         "max_requests": 40})
    sim.call(lambda: setattr(sim.sim.batches.cfg, "hold_models", ["strong"]))  # stage 2 stays in progress

    def strong_batches() -> int:
        return sim.call(lambda: sum(1 for b in sim.sim.batches.batches.values()
                                    if b.lines and b.lines[0].body.get("model") == "strong"))
    proc = start("run", str(write_config(tmp_path, cfg)), "-q")
    try:
        wait_for(lambda: strong_batches() > 0 or proc.poll() is not None, what="the second stage to be submitted")
        polled = batch_stats(sim).get("polls", 0)
        wait_for(lambda: proc.poll() is not None or batch_stats(sim).get("polls", 0) > polled + 2,
                 what="the run to poll the second stage")
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    weak_lines = batch_stats(sim)["lines_submitted"] - sum(
        n for _, m, _, n in chunks(tmp_path / "out") if m == "strong")
    assert weak_lines == rows
    sim.call(lambda: setattr(sim.sim.batches.cfg, "hold_models", []))
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0, summary.stop_message
    res = assert_each_id_once(tmp_path / "out", rows)
    stats, served = batch_stats(sim), sim.stats()["served_by_body"]
    assert set(served.values()) == {1} and stats["lines_submitted"] == len(served)  # nothing paid twice
    assert strong_batches() == sum(1 for _, m, _, _ in chunks(tmp_path / "out") if m == "strong")  # none made again
    assert set(res["cascade_stage"]) == {1, 2}


def test_retry_via_sync_sends_a_failed_line_and_its_rows_later_stages_synchronously(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, prices=PRICES, log_limit=1000,
                                    batch={**INSTANT, "line_rate_5xx": 0.2}))
    sim.start()
    try:
        rows = 60
        cfg = trust_job(tmp_path, sim, rows, "batch")
        cfg["batch"]["retry_via"] = "sync"
        s = pipeline.run(cfg, quiet=True)
        chat = sim.stats()["requests"]
        strong_sync = sim.call(lambda: sum(1 for e in sim.sim.service.acct.log
                                           if e.raw and b'"model":"strong"' in e.raw))
    finally:
        sim.stop()
    assert s.exit_code == 0, s.stop_message
    res = assert_each_id_once(tmp_path / "out", rows)
    assert set(res["cascade_stage"]) == {1, 2}
    in_files = sum(n for *_, n in chunks(tmp_path / "out"))
    assert chat > 0 and s.requests_sent == in_files + chat  # the failed lines (and what followed) went sync
    [(strong_retried,)] = store_query(tmp_path / "out", "SELECT count(*) FROM batch_lines JOIN batch_chunks USING "
                                      "(chunk) WHERE model = 'strong' AND outcome IN ('transient', 'missing')")
    # Beyond the strong lines retried sync: rows whose first-stage line went sync were escalated in sync mode.
    assert strong_sync > strong_retried
