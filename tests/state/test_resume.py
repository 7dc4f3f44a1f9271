"""Crash-safe resume (issue 3): durability, resume, changed jobs, graceful stop, cache, status, locking.

In-process runs use `pipeline.run` against the built-in simulator; everything about signals, locks and
other processes runs the real CLI (`python -m pipeline run`) against a SimulatorThread in this process,
whose `served_by_body` counts (sha256 of the raw body -> 200s served) say exactly what was paid for.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.errors import JobChangedError
from pipeline.reporting.status import job_status
from pipeline.state.jobdir import JobDir
from pipeline.state.store import Store
from pipeline.vocab import Record
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job, write_rows
from tests.support import (
    StderrLines,
    assert_each_id_once,
    child_env,
    cli,
    kill,
    max_unstored_at_kill,
    outputs,
    served_by_key,
    sim_job,
    start,
    stored_ok_keys,
    wait_for,
    write_config,
)

# -- store -------------------------------------------------------------------------------------------

def _rec(i: int, state: str = "ok", cost: float = 0.001, cache_hit: bool = False) -> Record:
    return Record(key=f"k{i:04d}", state=state, prompt_tokens=10, completion_tokens=5, cost_usd=cost,
                  cache_hit=cache_hit)


def test_store_tally_follows_replacements_and_upgrades_an_old_store(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    # A version-1 store: the responses table only, no tally or part index.
    old = sqlite3.connect(path)
    old.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE responses (key TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER, status INTEGER,
            error_class TEXT, message TEXT, content TEXT, output_json TEXT, finish_reason TEXT, model TEXT,
            provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL, latency_s REAL,
            ttft_s REAL, tool_calls_json TEXT, logprobs_json TEXT, cache_hit INTEGER, created_at REAL, raw BLOB);
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
    """)
    old.executemany("INSERT INTO responses (key, state, prompt_tokens, completion_tokens, cost_usd, cache_hit,"
                    " created_at) VALUES (?, ?, 10, 5, 0.001, 0, 1.0)", [(f"k{i:04d}", "ok") for i in range(7)])
    old.commit()
    old.close()
    ro = Store(path, readonly=True)  # `pipeline status` on a version-1 store still works (slow path)
    assert ro.totals()["by_state"] == {"ok": 7} and ro.parts() == {}
    ro.close()
    store = Store(path)
    assert store.totals()["by_state"] == {"ok": 7}
    store.put_now([_rec(7, "permanent", cost=0.0), _rec(8, cache_hit=True)])
    store.put_now([_rec(7, "ok", cost=0.002)])  # --retry-failed turned a failure into a success
    totals = store.totals()
    assert totals["by_state"] == {"ok": 9}  # the replaced failure no longer counts
    assert totals["prompt_tokens"] == 80  # the cache hit is counted in by_state, never charged
    assert totals["cost_usd"] == pytest.approx(0.009)
    truth = store._db.execute("SELECT count(*), sum(cost_usd) FROM responses WHERE cache_hit = 0").fetchone()
    assert truth == (8, pytest.approx(0.009))
    store.put_part(3, ok=5, failed=2, failed_transient=1, request_failed=2)
    assert store.parts()[3].failed_transient == 1
    store.close()


def test_a_dirty_wal_is_fsynced_by_the_store_thread(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite"), fsync_interval_s=0.05)
    synced: list[float] = []
    original = store._fsync
    store._fsync = lambda wal: (synced.append(time.monotonic()) if store._dirty else None, original(wal))[1]  # type: ignore[method-assign]
    store.put_now([_rec(1)])
    # The wrapper records before the real fsync clears the flag: wait for both, not for a moment.
    wait_for(lambda: bool(synced) and not store._dirty, what="an fsync of the dirty WAL")
    store.close()


def test_the_wal_is_fsynced_at_the_configured_interval(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite"), fsync_interval_s=0.25)
    store.close()  # its own thread stops; the loop runs below on a scripted clock instead

    class Ticks:
        """The stop event the loop waits on: each wait() is one interval passing, the 4th stops it."""

        timeouts: list[float | None] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.timeouts.append(timeout)
            return len(self.timeouts) > 3

    fsyncs: list[str] = []
    store._stop = Ticks()  # type: ignore[assignment]
    store._fsync = fsyncs.append  # type: ignore[method-assign]
    store._fsync_loop()
    assert Ticks.timeouts == [0.25] * 4  # every wait is the configured interval, never a busy loop
    assert fsyncs == [store.path + "-wal"] * 3  # one fsync per interval that passed, none after the stop


# -- resume ------------------------------------------------------------------------------------------

def _stopped_early(tmp_path: Path, rows: int, **sections: Any) -> tuple[dict[str, Any], pipeline.Summary]:
    """A job stopped by a run-fatal 401 after 6 answers: resumable, some batches partial."""
    cfg = job(tmp_path, rows, sim={"fault_plan": [{"requests": "7-", "fault": "401"}]},
              limits={"max_concurrency": 2}, input={"batch_size": 10}, **sections)
    s = pipeline.run(cfg)
    assert s.exit_code == 3 and 0 < s.succeeded < rows
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    return cfg, s


def test_settings_that_do_not_change_requests_may_change_between_resumes(tmp_path: Path) -> None:
    cfg, first = _stopped_early(tmp_path, 60)
    cfg["limits"] = {**cfg["limits"], "max_concurrency": 7, "requests_per_minute": 100_000, "max_retries": 3}
    cfg["budget"] = {"max_cost_usd": 50}
    cfg["run"] = {"progress": True, "grace_period_s": 5}
    cfg["output"] = {**cfg["output"], "fsync_interval_s": 0.3}
    cfg["input"]["batch_size"] = 7  # the job keeps its own batch size: parts hold fixed row ranges
    s = pipeline.run(cfg)
    assert (s.exit_code, s.succeeded, s.resumed_rows) == (0, 60, first.succeeded // 10 * 10)
    assert s.requests_sent == 60 - first.succeeded  # answers stored before the stop are not asked again
    assert_each_id_once(tmp_path / "out", 60)


@pytest.mark.parametrize("change,named", [
    ({"prompt": {"user": "Rate: {{ text }}"}}, "prompt.user"),
    ({"params": {"temperature": 0.5, "seed": 3}}, "params.seed, params.temperature"),
    ({"endpoint": {"model": "openai/gpt-4o"}}, "endpoint.model"),
    ({"structured": {"schema": {"type": "object", "properties": {"x": {"type": "string"}}}}}, "structured.schema"),
])
def test_a_changed_job_is_refused_naming_what_changed(tmp_path: Path, change: dict[str, Any], named: str) -> None:
    cfg, _ = _stopped_early(tmp_path, 30)
    changed = {**cfg, **{k: {**cfg[k], **v} for k, v in change.items()}}
    with pytest.raises(JobChangedError, match=named) as info:
        pipeline.run(changed)
    assert "--force-new" in str(info.value) and info.value.exit_code == 2
    s = pipeline.run(changed, force_new=True)  # the old answers move aside, never mixed in
    assert s.requests_sent == 30 and s.resumed_rows == 0
    aside = list((tmp_path / "out").glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "store.sqlite").exists()


def test_a_changed_input_file_is_data_not_a_new_job(tmp_path: Path) -> None:
    cfg, first = _stopped_early(tmp_path, 30)
    write_rows(tmp_path / "in.jsonl", 31)  # a row more: only what has no answer yet is asked
    s = pipeline.run(cfg)
    assert (s.exit_code, s.succeeded, s.requests_sent) == (0, 31, 31 - first.succeeded)


def test_permanent_failures_are_kept_until_retry_failed(tmp_path: Path) -> None:
    cfg = job(tmp_path, 12, sim={"fault_plan": [{"requests": "2,5", "fault": "422"}]},
              limits={"max_concurrency": 1}, input={"batch_size": 5})
    first = pipeline.run(cfg)
    assert (first.exit_code, first.failed) == (1, 2) and first.next_step and "--retry-failed" in first.next_step
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    again = pipeline.run(cfg)
    assert (again.exit_code, again.failed, again.requests_sent) == (1, 2, 0)  # never paid for twice
    retried = pipeline.run(cfg, retry_failed=True)
    assert (retried.exit_code, retried.succeeded, retried.requests_sent) == (0, 12, 2)
    assert_each_id_once(tmp_path / "out", 12)


def test_rows_whose_retries_ran_out_are_asked_again_on_resume(tmp_path: Path) -> None:
    cfg = job(tmp_path, 6, sim={"fault_plan": [{"requests": "1", "fault": "503"}]},
              limits={"max_concurrency": 1, "max_retries": 0}, input={"batch_size": 3})
    first = pipeline.run(cfg)
    assert (first.exit_code, first.failed, first.failures_by_class) == (1, 1, {"transient": 1})
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    again = pipeline.run(cfg)  # no flag needed: a transient failure is not an answer
    assert (again.exit_code, again.succeeded, again.requests_sent, again.resumed_rows) == (0, 6, 1, 3)
    assert_each_id_once(tmp_path / "out", 6)


def test_a_cache_dir_shared_by_two_jobs_answers_known_requests(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_rows(tmp_path / "b" / "in.jsonl", 40)  # the same 30 rows plus 10 new ones
    a = pipeline.run(job(tmp_path / "a", 30, cache={"dir": cache}))
    b = pipeline.run(job(tmp_path / "b", 40, cache={"dir": cache}))
    assert (a.requests_sent, a.cache_hits) == (30, 0)
    assert (b.exit_code, b.succeeded, b.requests_sent, b.cache_hits) == (0, 40, 10, 30)
    assert b.run_cost_usd < a.run_cost_usd / 2  # a hit costs nothing
    res = assert_each_id_once(tmp_path / "b" / "out", 40)
    hits = res.filter(pl.col("cache_hit"))
    assert hits.height == 30 and set(hits["rid"]) == {f"r{i:06d}" for i in range(30)}
    assert (hits["cost_usd"] == 0).all()
    assert json.loads((tmp_path / "b" / "out" / "summary.json").read_text())["cache_hits"] == 30


def test_pipeline_run_works_from_a_worker_thread(tmp_path: Path) -> None:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(pipeline.run(job(tmp_path, 5))))
    t.start()
    t.join(60)
    assert box and box[0].exit_code == 0


# -- other processes: signals, locks, status, torn WAL ------------------------------------------------

@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    thread = SimulatorThread(SimConfig(latency_ms=100, latency_jitter_ms=20, log_limit=20_000))
    thread.start()
    yield thread
    thread.stop()


def served_total(sim: SimulatorThread) -> int:
    return sum(sim.stats()["served_by_body"].values())


def test_ctrl_c_finishes_in_flight_writes_outputs_and_prints_the_resume_command(
        tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "out"
    # Answers take 0.1 s, the grace period is 10 minutes: the run must end when the requests in flight
    # are answered, not when the grace period runs out (the hang guard below would fail first).
    path = write_config(tmp_path, sim_job(tmp_path, sim, 300, limits={"max_concurrency": 8},
                                          input={"batch_size": 20}, run={"grace_period_s": 600}))
    proc = start("run", str(path), "-q", "--set", "limits.max_retries=8")
    wait_for(lambda: served_total(sim) >= 40, what="40 answers")
    running = job_status(str(out))  # from another process while the run writes
    assert (running["state"], running["pid"]) == ("running", proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    resume = shlex.join(["pipeline", "run", str(path), "--set", "limits.max_retries=8"])
    assert f"resume with: {resume}" in err
    before = served_by_key(sim)
    res, fail = outputs(out)
    # Requests in flight were allowed to finish: every answer paid for is stored and in the outputs.
    assert set(res["request_key"]) == set(before) and fail.height == 0 and 40 <= res.height < 300
    st = job_status(str(out))
    assert (st["state"], st["running"], st["rows_done"], st["rows_pending"]) == (
        "interrupted", False, res.height, 300 - res.height)
    assert st["cost_usd"] > 0 and st["prompt_tokens"] > 0 and st["last_update"]
    sim.reset(latency_ms=0, latency_jitter_ms=0)  # the resume need not wait
    done = cli(*shlex.split(resume)[1:], "-q")
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, 300)
    after = served_by_key(sim)
    assert not set(before) & set(after) and max(after.values()) == 1  # nothing paid twice
    assert len(before) + len(after) == 300


def test_a_second_signal_stops_at_once_and_the_store_stays_consistent(tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "out"
    sim.reset(latency_ms=600_000)  # answers that would take 10 minutes, and as long a grace period
    path = write_config(tmp_path, sim_job(tmp_path, sim, 40, limits={"max_concurrency": 4},
                                          run={"grace_period_s": 600}))
    proc = start("run", str(path), "-q")
    stderr = StderrLines(proc)
    wait_for(lambda: sim.stats()["in_flight"] >= 4, what="4 requests in flight")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: finishing requests in flight" in stderr.text(), what="the first signal's notice")
    assert proc.poll() is None and sim.stats()["in_flight"] == 4  # waiting for the requests in flight
    proc.send_signal(signal.SIGINT)
    err = stderr.finish(timeout=120)  # only the second signal can end the run before the hang guard
    assert proc.returncode == 130, err
    assert f"resume with: pipeline run {path}" in err
    db = sqlite3.connect(out / "store.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    sim.reset(latency_ms=0)
    done = cli("run", str(path), "-q")
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, 40)


def test_a_second_runner_on_the_same_output_dir_is_refused(tmp_path: Path) -> None:
    cfg = job(tmp_path, 5)
    path = write_config(tmp_path, cfg)
    holder = JobDir(cfg["output"]["dir"])
    holder.lock()  # as a running `pipeline run` holds it
    try:
        refused = cli("run", str(path), "-q")
        assert job_status(cfg["output"]["dir"])["pid"] == os.getpid()
    finally:
        holder.unlock()
    assert refused.returncode == 2
    assert f"in use by another run (pid {os.getpid()} on" in refused.stderr and "pipeline status" in refused.stderr
    assert cli("run", str(path), "-q").returncode == 0  # the lock is free again


def test_kill_9_then_a_torn_wal_tail_is_survived_and_status_says_so(tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "out"
    sim.reset(latency_ms=30, latency_jitter_ms=10)
    path = write_config(tmp_path, sim_job(tmp_path, sim, 400, limits={"max_concurrency": 16},
                                          input={"batch_size": 50}, output={"fsync_interval_s": 0.1}))
    proc = start("run", str(path), "-q")
    wait_for(lambda: served_total(sim) >= 150, what="150 answers")
    kill(proc)
    wait_for(lambda: sim.stats()["in_flight"] == 0, what="the simulator to go idle")
    st = job_status(str(out))
    assert (st["state"], st["running"]) == ("not running", False) and st["rows_pending"] > 0
    assert st["resume_command"] == f"pipeline run {path}"
    stored = stored_ok_keys(out)
    unstored = set(served_by_key(sim)) - stored  # answered, but the kill came before they were stored
    assert len(unstored) <= max_unstored_at_kill(16)
    wal = out / "store.sqlite-wal"
    data = wal.read_bytes()
    assert len(data) > 8192
    # Power lost mid-append: half of a frame (a copy of the last one, so its checksum chain breaks) + junk.
    frame = 24 + 4096
    wal.write_bytes(data + data[-frame:][: frame // 2] + os.urandom(700))
    assert stored_ok_keys(out) == stored  # a torn tail costs no stored answer, and readers do not mind
    assert job_status(str(out))["responses_stored"]["ok"] == len(stored)
    done = cli("run", str(path), "-q")
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, 400)
    served = served_by_key(sim)
    assert not [k for k in stored if served[k] != 1]  # nothing stored is paid for again
    assert {k for k, n in served.items() if n > 1} <= unstored  # re-sent: only what was in flight at the kill


NOTEBOOK = textwrap.dedent("""
    import asyncio, json, signal, sys
    import pipeline
    cfg = json.load(open(sys.argv[1]))
    async def cell():
        return pipeline.run(cfg)
    # Like ipykernel: a running loop and a SIGINT handler that raises KeyboardInterrupt (set here, as the
    # kernel does: a Python started with SIGINT ignored, e.g. from `nohup ... &`, would not install one).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = asyncio.new_event_loop()
    s = loop.run_until_complete(cell())
    print(json.dumps({"stopped": s.stopped, "exit_code": s.exit_code, "succeeded": s.succeeded}))
""")


def test_interrupting_a_notebook_cell_stops_the_job_instead_of_leaving_it_running(
        tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "out"
    path = write_config(tmp_path, sim_job(tmp_path, sim, 200, limits={"max_concurrency": 4},
                                          run={"grace_period_s": 600}))
    proc = subprocess.Popen([sys.executable, "-c", NOTEBOOK, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    wait_for(lambda: served_total(sim) >= 8 or proc.poll() is not None, what="the cell's job to be answered")
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the cell runs the job
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    got = json.loads(stdout.strip().splitlines()[-1])
    # Stopped, not run to the end behind the cell: 200 rows at 4 x 0.1 s take 5 s more.
    assert (got["stopped"], got["exit_code"]) == ("interrupted", 130) and 8 <= got["succeeded"] < 200
    assert not job_status(str(out))["running"]
