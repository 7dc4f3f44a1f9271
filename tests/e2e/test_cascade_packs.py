"""Trust features with several rows per request (`prompt.rows_per_request` > 1) end to end on the simulator
(per-model accuracy, calibrated logprobs, packed answers judged row by row): a packed cascade and audit
decide as one by one with the same columns, each row's cost is the sum of its shares over the stages it
visited, votes work packed, and a kill -9 in stage 2 resumes with no stage-1 row asked twice."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline_simulator.thread import SimulatorThread
from tests.e2e.test_cascade import kill_9_config, kill_9_sim, store_rows, trust_job
from tests.support import assert_each_id_once, cli, kill, start, wait_for

DECIDED = ["rid", "output", "model", "confidence", "confidence_by_field", "cascade_stage", "audit_agrees"]


def run_both(tmp_path: Path, rows: int, k: int, **sections: Any) -> tuple[pl.DataFrame, pl.DataFrame, Any]:
    """The same job one by one and packed (k rows per request): (one by one, packed, packed summary)."""
    frames, summary = [], None
    for name, per in (("one", 1), ("packed", k)):
        (tmp_path / name).mkdir()
        cfg = trust_job(tmp_path / name, rows, prompt={"rows_per_request": per}, **sections)
        summary = pipeline.run(cfg, quiet=True)
        assert summary.exit_code == 0 and summary.succeeded == rows, summary
        frames.append(assert_each_id_once(tmp_path / name / "out", rows).sort("rid"))
    return frames[0], frames[1], summary


def test_a_packed_cascade_with_an_audit_decides_as_one_by_one_and_sums_each_rows_shares(tmp_path: Path) -> None:
    audit = {"share": 0.3, "model": "strong", "min_agreement": 0.3}
    one, packed, summary = run_both(tmp_path, 120, 8, quality={"confidence": "logprobs", "audit": audit})
    assert one.columns == packed.columns and one.schema == packed.schema  # the same columns, the same types
    assert one.select(DECIDED).equals(packed.select(DECIDED))  # the same answers, confidences, stages, audit
    assert set(packed["cascade_stage"]) == {1, 2} and packed["audit_agrees"].drop_nulls().len() > 10
    # Rows travelled in packs at every stage: stage 1's 120 rows, the rows going on, the audited rows.
    assert summary.requests_sent < 120 / 8 + 60 / 8 + 60 / 8 + 6
    # A row's cost is its share of its stage-1 pack plus, escalated, its share of its stage-2 pack.
    stored = store_rows(tmp_path / "packed" / "out")
    assert summary.cost_usd == pytest.approx(sum(r["cost_usd"] for r in stored.values()), abs=1e-6)
    weak = {k: r for k, r in stored.items() if r["model"] == "weak"}
    assert len(weak) == 120 and all(r["cost_usd"] > 0 for r in weak.values())
    for row in packed.filter(pl.col("cascade_stage") == 2).iter_rows(named=True):
        strong = stored[row["request_key"]]
        assert strong["model"] == "strong" and row["cost_usd"] > strong["cost_usd"] > 0
    # Summed over the rows: every stage-1 share, and the stage-2 shares of the rows decided there (the
    # audit's answers for rows decided in stage 1 are the audit's cost, not a row's).
    decided_strong = set(packed.filter(pl.col("cascade_stage") == 2)["request_key"])
    expected = sum(r["cost_usd"] for r in weak.values()) + sum(stored[k]["cost_usd"] for k in decided_strong)
    assert packed["cost_usd"].sum() == pytest.approx(expected, abs=1e-9)
    # A re-run sends nothing and decides the same way.
    again = pipeline.run(trust_job(tmp_path / "packed", 120, prompt={"rows_per_request": 8},
                                   quality={"confidence": "logprobs", "audit": audit}), quiet=True)
    assert again.requests_sent == 0 and again.exit_code == 0
    assert assert_each_id_once(tmp_path / "packed" / "out", 120).sort("rid").equals(packed)


def test_packed_confidence_alone_is_the_rows_own_with_its_own_logprobs(tmp_path: Path) -> None:
    one, packed, _ = run_both(tmp_path, 40, 10, cascade=None, params={"max_tokens": 100, "logprobs": True},
                              endpoint={"model": "weak"})
    assert one.schema == packed.schema  # logprobs included: the same columns and types
    assert one.select("rid", "output", "confidence", "confidence_by_field").equals(
        packed.select("rid", "output", "confidence", "confidence_by_field"))
    assert packed["confidence"].null_count() == 0 and packed["confidence"].min() < 0.9
    # Each row's logprobs column holds the tokens of its own answer, not the whole pack's.
    for row in packed.head(5).iter_rows(named=True):
        text = "".join(t["token"] for t in row["logprobs"])
        assert f'"sentiment":"{row["output"]["sentiment"]}' in text and text.count('"sentiment"') == 1


def test_a_model_with_cache_breakpoints_gets_the_same_labels_and_confidences_packed(tmp_path: Path) -> None:
    # Claude models get the user message split at the end of its fixed start (prompt.cache: auto); the
    # packed row's text is the same text, so the simulator judges it the same and so does the pipeline.
    model = "anthropic/claude-3.5-haiku"
    sim = {"retry_after_s": 0.01, "flavor": "openai", "accuracy": {model: 0.8}}
    one, packed, _ = run_both(tmp_path, 30, 5, cascade=None, endpoint={"model": model, "simulator": sim})
    assert one.select("rid", "output", "confidence").equals(packed.select("rid", "output", "confidence"))
    assert packed["confidence"].min() < 0.9


@pytest.mark.parametrize("vote_by, stream", [("n", False), ("n", True), ("requests", False)])
def test_votes_with_packs(tmp_path: Path, vote_by: str, stream: bool) -> None:
    quality = {"confidence": "votes", "votes": 3, "vote_by": vote_by}
    cfg = trust_job(tmp_path, 40, quality=quality, cascade=None, prompt={"rows_per_request": 10},
                    endpoint={"model": "weak"}, params={"max_tokens": 100, "stream": stream})
    s = pipeline.run(cfg, quiet=True)
    assert s.exit_code == 0 and s.succeeded == 40
    assert s.requests_sent == (3 * 4 if vote_by == "requests" else 4)  # K packs per pack, or n in one
    res = assert_each_id_once(tmp_path / "out", 40)
    assert set(res["confidence"].round(4)) <= {0.3333, 0.6667, 1.0} and res["confidence"].min() < 1.0
    stored = store_rows(tmp_path / "out")
    assert res["cost_usd"].sum() == pytest.approx(sum(r["cost_usd"] for r in stored.values()), abs=1e-9)
    assert pipeline.run(cfg, quiet=True).requests_sent == 0


def rows_asked(sim: SimulatorThread, model: str) -> list[str]:
    """The row inputs of every pack the simulator received for `model`."""
    raws = sim.call(lambda: [e.raw for e in sim.sim.service.acct.log if e.raw is not None])
    out: list[str] = []
    for raw in raws:
        body = json.loads(raw)
        if body.get("model") == model:
            out += [r["input"] for r in json.loads(body["messages"][-1]["content"])["rows"]]
    return out


def test_kill_9_in_a_packed_second_stage_resumes_each_id_once_and_asks_no_first_stage_row_twice(
        tmp_path: Path) -> None:
    rows = 200
    sim = kill_9_sim(latency_ms=40)
    try:
        path = kill_9_config(tmp_path, sim, rows, max_concurrency=3, prompt={"rows_per_request": 5})
        proc = start("run", str(path), "-q")
        wait_for(lambda: len(rows_asked(sim, "strong")) >= 15 or proc.poll() is not None,
                 what="the second stage to start")
        assert proc.poll() is None, "the run ended before the second stage could be killed"
        kill(proc)
        wait_for(lambda: sim.stats()["in_flight"] == 0, what="the simulator to go idle")
        at_kill = len(rows_asked(sim, "strong"))
        final = cli("run", str(path), "-q", timeout=300)
        assert final.returncode == 0, final.stderr
        res = assert_each_id_once(tmp_path / "out", rows)
        weak = rows_asked(sim, "weak")
        assert len(weak) == rows and len(set(weak)) == rows  # stage 1: every row asked once, ever
        strong = rows_asked(sim, "strong")
        assert len(strong) > at_kill and set(res["cascade_stage"]) == {1, 2}
        assert len(set(strong)) == res.filter(pl.col("cascade_stage") == 2).height
        stored = store_rows(tmp_path / "out")
        assert sum(1 for r in stored.values() if r["model"] == "weak") == rows
    finally:
        sim.stop()
