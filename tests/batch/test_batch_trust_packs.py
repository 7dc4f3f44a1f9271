"""A cascade, the audit and votes as requests with several rows per request in run.mode: batch: every
stage's lines are that stage's packs (as sync mode packs them), split into rows by the stage's own pack
sender; the decisions, confidences and request keys are sync mode's, at batch prices."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.batch.test_batch import batch_stats
from tests.batch.test_batch_trust import INSTANT, chunks, kill_as_stage_2_is_created_then_resume, stored, trust_job
from tests.e2e.test_cascade import ACCURACY, PRICES
from tests.support import TEST_KEY_ENV, assert_each_id_once, cli_in_process, write_config

K = 6
COMPARED = ["rid", "output", "model", "cascade_stage", "confidence", "confidence_by_field", "request_key",
            "audit_agrees"]


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorThread]:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, prices=PRICES, log_limit=0, batch=INSTANT))
    thread.start()
    yield thread
    thread.stop()


def both(tmp_path: Path, sim: SimulatorThread, rows: int, **sections: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("sync", "batch"):
        (tmp_path / mode).mkdir()
        cfg = trust_job(tmp_path / mode, sim, rows, mode, prompt={"rows_per_request": K}, **sections)
        summary = pipeline.run(cfg, quiet=True)
        assert summary.exit_code == 0, summary.stop_message
        out[mode] = (summary, assert_each_id_once(tmp_path / mode / "out", rows).sort("rid"), cfg)
    return out


def test_a_packed_cascade_with_an_audit_in_batch_mode_decides_as_sync_mode(tmp_path: Path,
                                                                          sim: SimulatorThread) -> None:
    rows = 90
    audit = {"share": 0.3, "model": "strong", "min_agreement": 0.3}
    runs = both(tmp_path, sim, rows, quality={"confidence": "logprobs", "audit": audit})
    (s_sync, sync, _), (s_batch, batch, cfg) = runs["sync"], runs["batch"]
    assert sync.schema == batch.schema and sync.select(COMPARED).equals(batch.select(COMPARED))
    assert set(batch["cascade_stage"]) == {1, 2} and batch["audit_agrees"].drop_nulls().len() > 10
    # At batch prices (half here). Stage 2's packs group rows differently from sync mode's (the audit's rows
    # go ahead in batch mode), so a row's share differs a little; the bill is about half.
    assert s_batch.cost_usd == pytest.approx(s_sync.cost_usd / 2, rel=0.1)
    assert batch.filter(batch["cascade_stage"] == 1)["cost_usd"].to_list() == pytest.approx(
        [c / 2 for c in sync.filter(sync["cascade_stage"] == 1)["cost_usd"]], rel=1e-6)
    # Every line a pack of its model's rows; each row asked of the same models as in sync mode, once (the
    # audit's rows are packed ahead of stage 2 in batch mode, so stage 2's packs group rows differently).
    assert stored(tmp_path / "batch" / "out") == stored(tmp_path / "sync" / "out")
    assert s_batch.requests_sent < rows and s_sync.requests_sent < rows
    files = chunks(tmp_path / "batch" / "out")
    weak_lines = sum(n for _, m, _, n in files if m == "weak")
    assert weak_lines == -(-rows // K) and {m for _, m, _, _ in files} == {"weak", "strong"}
    again = pipeline.run(cfg, quiet=True)
    assert again.exit_code == 0 and again.requests_sent == 0


def test_votes_as_requests_with_packs_in_batch_mode(tmp_path: Path, sim: SimulatorThread) -> None:
    quality = {"confidence": "votes", "votes": 3, "vote_by": "requests"}
    runs = both(tmp_path, sim, 30, quality=quality, cascade=None, endpoint={"model": "weak"})
    (s_sync, sync, _), (s_batch, batch, _) = runs["sync"], runs["batch"]
    assert sync.select("rid", "output", "confidence").equals(batch.select("rid", "output", "confidence"))
    assert s_batch.requests_sent == s_sync.requests_sent == 3 * 5  # K packs per pack of 6 rows
    assert batch["confidence"].min() < 1.0


def test_the_dry_run_of_a_packed_cascade_in_batch_mode(tmp_path: Path, sim: SimulatorThread) -> None:
    cfg = trust_job(tmp_path, sim, 30, "batch", prompt={"rows_per_request": K})
    r = cli_in_process("run", str(write_config(tmp_path, cfg)), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["requests"] == 5


def test_kill_in_a_packed_second_stage_resumes_each_id_once_and_pays_no_pack_twice(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, per_file = 120, 6  # 20 weak packs of 6 rows, in files of 6 lines
    cfg = trust_job(tmp_path, sim, rows, "batch", prompt={"rows_per_request": K},
                    batch={"poll_interval_s": 0.001, "poll_max_interval_s": 0.01, "max_requests": per_file})
    kill_as_stage_2_is_created_then_resume(cfg, tmp_path / "out", -(-rows // K // per_file), monkeypatch)
    res = assert_each_id_once(tmp_path / "out", rows)
    answers = stored(tmp_path / "out")
    assert list(answers.values()).count("weak") == rows  # every row's stage-1 answer, from its pack
    served = sim.stats()["served_by_body"]
    assert set(served.values()) == {1}  # no pack answered twice
    stats = batch_stats(sim)
    assert stats["lines_submitted"] == len(served)  # nor submitted twice
    assert set(stats["created_by_chunk"].values()) == {1}  # the batch the kill hid was adopted, not made again
    assert set(res["cascade_stage"]) == {1, 2}
