"""A batch run killed at each step, then run again: no second batch (or upload) for the same lines, no line
answered twice, every row exactly once. The kills are injected failure points raising at the step
(in-process), plus one real kill -9 of the CLI while it polls."""
from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import pipeline
from pipeline.batch import driver
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.batch.test_batch import FAST, batch_stats
from tests.support import TEST_KEY_ENV as KEY_ENV
from tests.support import assert_each_id_once, sim_job, start, wait_for, write_config

ROWS = 100
FILES = 3  # 40 lines a file


class Killed(BaseException):
    """Not an Exception: nothing in the pipeline may catch it, as nothing survives a kill."""


def kill_at(step: str, nth: int, out: Path) -> Callable[[str], None]:
    seen = {"n": 0}

    def hook(at: str) -> None:
        if at != step:
            return
        seen["n"] += 1
        if seen["n"] == nth:
            if step == "downloading":  # the kill lands halfway through the file
                for part in (out / "batch").glob("*.part"):
                    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
            raise Killed(step)
    return hook


def kill_9_while_polling(sim: SimulatorThread, config: Path, files: int) -> None:
    """Run the job at `config` as a child process; kill -9 it once it has created its `files` batches and
    polled them again (the simulator must hold them in progress)."""
    proc = start("run", str(config), "-q")
    try:
        wait_for(lambda: batch_stats(sim).get("batches_created", 0) == files or proc.poll() is not None,
                 timeout=60, what="the run to submit its batches")
        polled = sim.stats()["batch"].get("polls", 0)
        wait_for(lambda: proc.poll() is not None or sim.stats()["batch"].get("polls", 0) > polled + files,
                 timeout=30, what="the run to poll")
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.parametrize("step,nth", [("writing", 55), ("uploaded", 2), ("created", 2), ("polling", 3),
                                      ("downloading", 1)])
def test_a_kill_at_each_step_submits_nothing_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   step: str, nth: int) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(seed=5, log_limit=0))
    sim.start()
    try:
        cfg = sim_job(tmp_path, sim, ROWS, run={"mode": "batch", "progress": False},
                      batch={**FAST, "max_requests": 40})
        monkeypatch.setattr(driver, "FAULT_HOOK", kill_at(step, nth, tmp_path / "out"))
        with pytest.raises(Killed):
            pipeline.run(cfg)
        monkeypatch.setattr(driver, "FAULT_HOOK", None)
        assert pipeline.run(cfg).exit_code == 0
        stats = batch_stats(sim)
        served = sim.stats()["served_by_body"]
    finally:
        sim.stop()
    assert stats["batches_created"] == FILES and set(stats["created_by_chunk"].values()) == {1}
    assert stats["files_uploaded"] == FILES  # an upload the kill hid was adopted, not repeated
    assert stats["lines_submitted"] == ROWS
    assert len(served) == ROWS and set(served.values()) == {1}  # no line answered twice
    if step == "downloading":
        assert stats["downloads_resumed"] == 1
    assert_each_id_once(tmp_path / "out", ROWS)


def test_kill_9_while_polling_then_the_same_command_collects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(seed=9, log_limit=0, batch={"in_progress_polls": 1_000_000}))
    sim.start()
    try:
        cfg = sim_job(tmp_path, sim, ROWS, run={"mode": "batch", "progress": False},
                      batch={"poll_interval_s": 0.05, "poll_max_interval_s": 0.05, "max_requests": 40})
        kill_9_while_polling(sim, write_config(tmp_path, cfg), FILES)
        sim.call(lambda: setattr(sim.sim.batches.cfg, "in_progress_polls", 1))
        summary = pipeline.run({**cfg, "batch": {**FAST, "max_requests": 40}})
        stats = batch_stats(sim)
    finally:
        sim.stop()
    assert summary.exit_code == 0
    assert stats["batches_created"] == FILES and stats["lines_submitted"] == ROWS
    assert_each_id_once(tmp_path / "out", ROWS)
