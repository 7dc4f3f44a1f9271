"""`pipeline status` while a run is going and after it was killed (issue 19 item 14): the answers stored
so far count as rows done (not "0 done" beside "responses ok 16"), with rows/s and, while it runs, an ETA.

The runner is the real CLI in a child process (it must hold the folder's lock, then die by kill -9); the
simulator in this process answers slowly enough that the run is still going when status looks.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.support import cli_in_process, kill, sim_job, start, stored_ok_keys, wait_for, write_config

ROWS = 400


def _stored(out: Path) -> int:
    try:
        return len(stored_ok_keys(out))
    except sqlite3.OperationalError:  # the run has not created the store (or its tables) yet
        return 0


def _status(out: Path) -> dict:
    done = cli_in_process("status", str(out), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_counts_stored_answers_during_a_run_and_after_a_kill(tmp_path: Path) -> None:
    sim = SimulatorThread(SimConfig(latency_ms=40))
    sim.start()
    try:
        out = tmp_path / "out"
        # One batch of 400 rows: no part file is written before the batch ends, so only the store knows.
        path = write_config(tmp_path, sim_job(tmp_path, sim, ROWS, limits={"max_concurrency": 2},
                                              input={"batch_size": ROWS}, output={"fsync_interval_s": 0.05}))
        proc = start("run", str(path), "-q")
        try:
            wait_for(lambda: _stored(out) >= 10 or proc.poll() is not None, what="10 stored answers")
            assert proc.poll() is None, "the run ended before status could look"
            st = _status(out)
            assert st["state"] == "running"
            live = st["this_run"]
            assert live["answers"] >= 10 and live["rows_per_s"] > 0 and live["eta_s"] is not None
            assert st["rows_done"] >= 10 and st["rows_pending"] == ROWS - st["rows_done"] - st["rows_failed"]
            plain = cli_in_process("status", str(out))
            assert "answers stored since" in plain.stdout and "ETA" in plain.stdout
        finally:
            kill(proc)
        stored = _stored(out)
        st = _status(out)
        assert st["state"] == "not running" and st["this_run"]["answers"] == stored
        assert st["rows_done"] == stored and st["rows_pending"] == ROWS - stored
        assert st["this_run"]["eta_s"] is None
        plain = cli_in_process("status", str(out))
        assert "re-run the same command to resume" in plain.stdout
    finally:
        sim.stop()
