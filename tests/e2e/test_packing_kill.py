"""kill -9 during a packed run (`prompt.rows_per_request: 10`), then resume: every id lands exactly once,
and no row whose answer was stored before a kill is asked again after it (a pack's rows are committed
together, so a kill leaves all of them stored or none).

The runner is the real CLI in a child process; the simulator runs in this process and logs every
request's raw body, from which the rows each pack asked are read back. Each kill comes after a random
number of arrivals AND once the run has stored an answer of its own (events, not time: a busy machine
moves the moment, never what a kill leaves behind), so every kill has stored rows for the check to bite
on; to replay one, set KILL_TEST_SEED."""
from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from pathlib import Path

from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.support import assert_each_id_once, cli, kill, sim_job, start, stored_ok_keys, wait_for, write_config

ROWS = 1500
K = 10
CONCURRENCY = 8
KILLS = 3


def asked_rows(sim: SimulatorThread, after: int = 0) -> list[str]:
    """The rows (their texts) of every pack that arrived after arrival number `after`."""
    raws = sim.call(lambda: [(e.n, e.raw) for e in sim.sim.service.acct.log if e.raw is not None])
    rows: list[str] = []
    for n, raw in raws:
        if n > after:
            body = json.loads(raw)
            rows += [r["input"] for r in json.loads(body["messages"][-1]["content"])["rows"]]
    return rows


def test_kill_9_during_a_packed_run_then_resume_lands_every_id_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("KILL_TEST_SEED") or time.time_ns() % 2**31)
    rng = random.Random(seed)
    sim = SimulatorThread(SimConfig(latency_ms=20, latency_jitter_ms=15, rate_503=0.02, seed=seed,
                                    log_limit=100_000))
    sim.start()
    try:
        out = tmp_path / "out"
        path = write_config(tmp_path, sim_job(
            tmp_path, sim, ROWS, prompt={"rows_per_request": K}, input={"batch_size": 100},
            limits={"max_concurrency": CONCURRENCY, "max_retries": 12}, output={"fsync_interval_s": 0.2}))
        # Per kill: the answers the store held, and the last arrival before the next run started.
        kills: list[tuple[set[str], int]] = []
        for _ in range(KILLS):
            moment, held = sim.stats()["requests"] + rng.randint(5, 40), stored_count(out)
            proc = start("run", str(path), "-q")
            # Its first CONCURRENCY packs go out before any answer is back: a kill among them would leave
            # nothing of this run stored to check, so the kill waits for both events.
            wait_for(lambda moment=moment, held=held, proc=proc: proc.poll() is not None or (
                     sim.stats()["requests"] >= moment and stored_count(out) > held),
                     what=f"request {moment} and a stored answer (seed {seed})")
            if proc.poll() is not None:  # it finished before this kill: the last kills' rows were few
                err = proc.communicate()[1]
                assert proc.returncode == 0, f"seed {seed}: the run failed: {err}"
                break
            kill(proc)
            wait_for(lambda: sim.stats()["in_flight"] == 0, what="the simulator to go idle")
            kills.append((stored_ok_keys(out), sim.stats()["requests"]))
        final = cli("run", str(path), "-q", timeout=300)
        assert final.returncode == 0, f"seed {seed}: {final.stderr}"
        results = assert_each_id_once(out, ROWS)
        text_of = {key: f"review number {int(rid[1:])}: works fine, arrived late"
                   for rid, key in zip(results["rid"], results["request_key"])}
        assert kills, f"seed {seed}: no run was killed"
        for stored, last in kills:
            assert stored, f"seed {seed}: nothing was stored before a kill"
            again = set(asked_rows(sim, after=last)) & {text_of[k] for k in stored}
            assert not again, f"seed {seed}: {len(again)} rows stored before a kill were asked again"
        packs = [len(r) for r in _packs(sim)]
        assert max(packs) == K and sum(packs) >= ROWS
    finally:
        sim.stop()


def stored_count(out: Path) -> int:
    """Answers in the job's store so far; 0 before the run has created it."""
    try:
        return len(stored_ok_keys(out)) if (out / "store.sqlite").exists() else 0
    except sqlite3.OperationalError:  # created but its tables not yet: nothing stored
        return 0


def _packs(sim: SimulatorThread) -> list[list[str]]:
    raws = sim.call(lambda: [e.raw for e in sim.sim.service.acct.log if e.raw is not None])
    return [[r["input"] for r in json.loads(json.loads(raw)["messages"][-1]["content"])["rows"]] for raw in raws]
