"""Packs in batch mode (`prompt.rows_per_request` > 1 with `run.mode: batch`, issue 21) over the simulator's
Batch API: the same packs and labels as the sync mode, a garbled packed answer asks again exactly the rows
it failed (each alone, in the next batch), and kills at every batch step leave every id exactly once
without paying for any pack twice."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.batch import driver
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.batch.test_batch import FAST, batch_stats
from tests.batch.test_batch_kill import Killed, kill_9_while_polling, kill_at
from tests.e2e.test_cascade import trust_job
from tests.support import TEST_KEY_ENV as KEY_ENV
from tests.support import assert_each_id_once, outputs, sim_job, write_config


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _sim(**cfg: Any) -> SimulatorThread:
    sim = SimulatorThread(SimConfig(seed=7, log_limit=0, **cfg))
    sim.start()
    return sim


def _labels(out: Path) -> dict[str, Any]:
    results, failures = outputs(out)
    assert failures.height == 0, failures
    return {r["rid"]: r["output"] for r in results.iter_rows(named=True)}


def _asked(sim: SimulatorThread) -> list[list[list[str]]]:
    """Per batch created, in order: each line's rows (their inputs), as the simulator received them."""
    def read() -> list[list[list[str]]]:
        return [[[r["input"] for r in json.loads(line.body["messages"][-1]["content"])["rows"]] for line in b.lines]
                for b in sim.sim.batches.batches.values()]
    return sim.call(read)


def test_a_packed_batch_run_sends_the_sync_packs_and_gets_the_same_labels_at_half_the_price(tmp_path: Path) -> None:
    sim = _sim()
    try:
        packed = {"rows_per_request": 10}
        sync = pipeline.run(sim_job(tmp_path, sim, 40, prompt=packed, output={"dir": str(tmp_path / "sync")}))
        batch = pipeline.run(sim_job(tmp_path, sim, 40, prompt=packed, output={"dir": str(tmp_path / "batch")},
                                     run={"mode": "batch", "progress": False}, batch=FAST))
        stats = batch_stats(sim)
        served = sim.stats()["served_by_body"]
    finally:
        sim.stop()
    assert sync.exit_code == batch.exit_code == 0
    assert sync.requests_sent == 4 and stats["lines_submitted"] == 4  # one line per pack of ten
    # The simulator counts a body answered in both modes twice: every pack went out byte for byte the same.
    assert len(served) == 4 and set(served.values()) == {2}
    assert _labels(tmp_path / "sync") == _labels(tmp_path / "batch")
    a, _ = outputs(tmp_path / "sync")
    b, _ = outputs(tmp_path / "batch")
    assert a.schema == b.schema
    assert a.sort("rid")["request_key"].to_list() == b.sort("rid")["request_key"].to_list()
    assert b["cost_usd"].sum() == pytest.approx(a["cost_usd"].sum() / 2, rel=0.02)  # the Batch API's half
    assert b["cost_usd"].sum() == pytest.approx(batch.cost_usd)


def test_a_garbled_packed_answer_asks_exactly_its_three_failed_rows_again_each_alone(tmp_path: Path) -> None:
    clean = _sim()
    try:
        one = pipeline.run(sim_job(tmp_path, clean, 5, output={"dir": str(tmp_path / "one")}))
    finally:
        clean.stop()
    sim = _sim(garble_packs=True)
    try:
        cfg = sim_job(tmp_path, sim, 5, prompt={"rows_per_request": 5}, run={"mode": "batch", "progress": False},
                      batch=FAST)
        summary = pipeline.run(cfg)
        asked = _asked(sim)
        stats = batch_stats(sim)
        billed = sim.stats()
    finally:
        sim.stop()
    assert one.exit_code == summary.exit_code == 0 and summary.succeeded == 5, summary
    texts = [f"review number {i}: works fine, arrived late" for i in range(5)]  # "Review: " travels once
    # One line of all five rows; then, in the next batch, exactly the two dropped rows (ids 2, 3) and the
    # one answered twice (id 4), each in a line of its own. The invented id 99 was given to no row.
    assert asked[0] == [texts]
    assert sorted(asked[1]) == [[texts[1]], [texts[2]], [texts[3]]]
    assert len(asked) == 2 and stats["lines_submitted"] == 4
    assert _labels(tmp_path / "out") == _labels(tmp_path / "one")  # nothing mis-assigned
    results, _ = outputs(tmp_path / "out")
    assert (results["attempts"] > 1).sum() == 3  # the three rows asked twice say so
    # The four lines' bills, apportioned to their rows: the rows add up to what was billed.
    assert results["prompt_tokens"].sum() == billed["tokens"]["prompt"]
    assert results["completion_tokens"].sum() == billed["tokens"]["completion"]
    assert results["cost_usd"].sum() == pytest.approx(summary.cost_usd)


def test_retry_via_sync_sends_the_rows_of_failed_pack_lines_as_packed_chat_requests(tmp_path: Path) -> None:
    sim = _sim(batch={"line_rate_5xx": 0.3})
    try:
        summary = pipeline.run(sim_job(tmp_path, sim, 50, prompt={"rows_per_request": 5},
                                       run={"mode": "batch", "progress": False}, batch={**FAST, "retry_via": "sync"}))
        stats = sim.stats()
    finally:
        sim.stop()
    assert summary.exit_code == 0, summary
    assert stats["batch"]["lines_submitted"] == 10 and stats["batch"]["batches_created"] == 1
    failed_lines = summary.retries["transient"]
    assert failed_lines > 0 and 0 < stats["requests"] <= failed_lines  # their rows went by chat, packed again
    assert_each_id_once(tmp_path / "out", 50)


def test_the_budget_holds_each_pack_line_at_the_packs_worst_case_and_finishes_in_one_run(tmp_path: Path) -> None:
    # A pack of ten reserves ~$0.034 (its prompt and 2,176 output tokens at half of $30/M); it costs about a
    # fifth of that. A $0.1 cap holds two packs at their worst: the rest go as earlier ones are paid for.
    sim = _sim()
    try:
        summary = pipeline.run(sim_job(tmp_path, sim, 60, prompt={"rows_per_request": 10}, budget={"max_cost_usd": 0.1},
                                       run={"mode": "batch", "progress": False}, batch=FAST))
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 0 and summary.pending == 0, summary
    assert summary.cost_usd <= 0.1
    assert stats["batches_created"] > 1 and stats["lines_submitted"] == 6  # split to fit, no pack twice
    assert_each_id_once(tmp_path / "out", 60)


ROWS, K = 100, 5  # 20 packs: 3 files of 8 lines; the garbled packs leave 60 rows for 8 files of their own


@pytest.mark.parametrize("step,nth", [("writing", 12), ("uploaded", 2), ("created", 2), ("polling", 4),
                                      ("downloading", 2), ("created", 5), ("writing", 30)])
def test_a_kill_at_each_step_of_a_packed_batch_run_pays_no_pack_twice(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      step: str, nth: int) -> None:
    sim = _sim(garble_packs=True)
    try:
        cfg = sim_job(tmp_path, sim, ROWS, prompt={"rows_per_request": K}, run={"mode": "batch", "progress": False},
                      batch={**FAST, "max_requests": 8})
        monkeypatch.setattr(driver, "FAULT_HOOK", kill_at(step, nth, tmp_path / "out"))
        with pytest.raises(Killed):
            pipeline.run(cfg)
        monkeypatch.setattr(driver, "FAULT_HOOK", None)
        summary = pipeline.run(cfg)
        stats = batch_stats(sim)
        served = sim.stats()["served_by_body"]
    finally:
        sim.stop()
    assert summary.exit_code == 0, summary
    assert set(stats["created_by_chunk"].values()) == {1}  # no file became two batches
    assert len(served) == ROWS // K + ROWS // K * 3 and set(served.values()) == {1}  # every pack paid once
    assert stats["lines_submitted"] == len(served)
    assert_each_id_once(tmp_path / "out", ROWS)


def test_kill_9_of_a_packed_batch_run_then_the_same_command_finishes(tmp_path: Path) -> None:
    sim = _sim(garble_packs=True, batch={"in_progress_polls": 1_000_000})
    try:
        cfg = sim_job(tmp_path, sim, ROWS, prompt={"rows_per_request": K}, run={"mode": "batch", "progress": False},
                      batch={"poll_interval_s": 0.05, "poll_max_interval_s": 0.05, "max_requests": 8})
        kill_9_while_polling(sim, write_config(tmp_path, cfg), 3)
        sim.call(lambda: setattr(sim.sim.batches.cfg, "in_progress_polls", 1))
        summary = pipeline.run({**cfg, "batch": {**FAST, "max_requests": 8}})
        served = sim.stats()["served_by_body"]
    finally:
        sim.stop()
    assert summary.exit_code == 0, summary
    assert len(served) == ROWS // K * 4 and set(served.values()) == {1}
    assert_each_id_once(tmp_path / "out", ROWS)


def test_each_packed_rows_confidence_in_batch_mode_is_the_one_sync_mode_measures(tmp_path: Path) -> None:
    frames = []
    for mode in ("sync", "batch"):
        (tmp_path / mode).mkdir()
        cfg = trust_job(tmp_path / mode, 40, cascade=None, prompt={"rows_per_request": 10}, endpoint={"model": "weak"},
                        params={"max_tokens": 100, "logprobs": True}, run={"mode": mode, "progress": False},
                        batch=FAST)
        summary = pipeline.run(cfg, quiet=True)
        assert summary.exit_code == 0 and summary.succeeded == 40, summary
        frames.append(assert_each_id_once(tmp_path / mode / "out", 40).sort("rid"))
    columns = ["rid", "output", "confidence", "confidence_by_field", "logprobs"]
    assert frames[0].select(columns).equals(frames[1].select(columns))
    assert frames[1]["confidence"].null_count() == 0 and frames[1]["confidence"].min() < 0.9
