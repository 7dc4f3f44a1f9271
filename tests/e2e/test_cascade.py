"""Cascades and the audit gate end to end, on the simulator with per-model accuracy (calibrated logprobs):
who decides each row, what it cost, kill -9 in the second stage, and the gate's exit 4."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

import pipeline
from pipeline.read import storage
from pipeline.reporting.data import load_run
from pipeline.reporting.html_quality import quality_section
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job
from tests.ops.test_ops import Receiver
from tests.support import (
    TEST_KEY_ENV,
    assert_each_id_once,
    cli,
    cli_in_process,
    kill,
    served_by_key,
    sim_job,
    start,
    store_query,
    wait_for,
    write_config,
)

SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
                                           "spam": {"type": "boolean"}},
          "required": ["sentiment", "spam"], "additionalProperties": False}
ACCURACY = {"weak": 0.85, "strong": 0.97}
PRICES = {"weak": {"input_per_m": 0.15, "output_per_m": 0.6}, "strong": {"input_per_m": 2.5, "output_per_m": 10.0}}


def trust_job(tmp_path: Path, rows: int, **sections: Any) -> dict[str, Any]:
    sim = {"flavor": "openai", "accuracy": ACCURACY, "prices": PRICES}
    cfg = job(tmp_path, rows, sim=sim, structured={"schema": SCHEMA, "mode": "json_schema"},
              quality={"confidence": "logprobs"}, prices=PRICES,
              cascade=[{"model": "weak", "min_confidence": 0.9}, {"model": "strong"}])
    cfg["params"] = {"max_tokens": 100}
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def store_rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = store_query(out, "SELECT key, model, state, confidence, cost_usd FROM responses")
    return {k: {"model": m, "state": s, "confidence": c, "cost_usd": cost} for k, m, s, c, cost in rows}


def kill_9_sim(latency_ms: float) -> SimulatorThread:
    """A started simulator on its own thread, for a cascade run in a child process to be killed in: slow
    enough to be caught mid-stage, logging every request body."""
    sim = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, prices=PRICES, latency_ms=latency_ms,
                                    log_limit=100_000))
    sim.start()
    return sim


def kill_9_config(tmp_path: Path, sim: SimulatorThread, rows: int, max_concurrency: int, **sections: Any) -> Path:
    """trust_job answered by `sim`, all rows in one input batch, written for a child process to run."""
    cfg = sim_job(tmp_path, sim, rows, structured={"schema": SCHEMA, "mode": "json_schema"},
                  quality={"confidence": "logprobs"}, prices=PRICES, input={"batch_size": rows},
                  cascade=[{"model": "weak", "min_confidence": 0.9}, {"model": "strong"}],
                  limits={"max_concurrency": max_concurrency}, output={"fsync_interval_s": 0.05}, **sections)
    cfg["params"] = {"max_tokens": 100}
    return write_config(tmp_path, cfg)


def test_the_first_stage_decides_the_sure_rows_and_the_last_stage_the_rest(tmp_path: Path) -> None:
    summary = pipeline.run(trust_job(tmp_path, 120), quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 120
    res = assert_each_id_once(tmp_path / "out", 120)
    assert {"confidence", "confidence_by_field", "cascade_stage"} <= set(res.columns)
    assert res.schema["confidence_by_field"] == pl.Struct({"sentiment": pl.Float64, "spam": pl.Float64})
    by_stage = dict(res.group_by("cascade_stage").len().iter_rows())
    assert by_stage[1] > 40 and by_stage[2] > 10  # the weak model is sure of most rows, not all
    first = res.filter(pl.col("cascade_stage") == 1)
    assert set(first["model"]) == {"weak"} and first["confidence"].min() >= 0.9
    second = res.filter(pl.col("cascade_stage") == 2)
    assert set(second["model"]) == {"strong"}
    # A row decided in stage 2 paid for both stages: the weak answer (under the threshold) and the strong one.
    stored = store_rows(tmp_path / "out")
    for row in second.iter_rows(named=True):
        strong = stored[row["request_key"]]
        assert row["cost_usd"] > strong["cost_usd"] > 0
    weak_costs = [r["cost_usd"] for r in stored.values() if r["model"] == "weak"]
    assert summary.cost_usd == pytest.approx(sum(r["cost_usd"] for r in stored.values()), abs=1e-6)
    assert res["cost_usd"].sum() == pytest.approx(summary.cost_usd, abs=1e-6) and len(weak_costs) == 120
    assert [s["rows_decided"] for s in summary.quality["cascade"]] == [by_stage[1], by_stage[2]]
    # A re-run sends nothing and decides the same way.
    again = pipeline.run(trust_job(tmp_path, 120), quiet=True)
    assert again.requests_sent == 0 and again.exit_code == 0
    assert assert_each_id_once(tmp_path / "out", 120).sort("rid").equals(res.sort("rid"))


def test_a_raised_threshold_reuses_every_answer_and_sends_only_new_escalations(tmp_path: Path) -> None:
    pipeline.run(trust_job(tmp_path, 60), quiet=True)
    before = store_rows(tmp_path / "out")
    stricter = trust_job(tmp_path, 60, cascade=[{"model": "weak", "min_confidence": 0.999}, {"model": "strong"}])
    s = pipeline.run(stricter, quiet=True)
    res = assert_each_id_once(tmp_path / "out", 60)
    after = store_rows(tmp_path / "out")
    assert set(before) < set(after) and s.requests_sent == len(after) - len(before)
    assert res.filter(pl.col("cascade_stage") == 1)["confidence"].min() >= 0.999


def test_cascade_config_errors_name_the_key(tmp_path: Path) -> None:
    for cascade, quality, key in (
            ([{"model": "weak"}, {"model": "strong"}], {"confidence": "logprobs"}, "cascade.0.min_confidence"),
            ([{"model": "weak", "min_confidence": 0.9}], {"confidence": "logprobs"}, "cascade"),
            ([{"model": "weak", "min_confidence": 0.9}, {"model": "strong", "min_confidence": 0.5}],
             {"confidence": "logprobs"}, "cascade.1.min_confidence"),
            ([{"model": "weak", "min_confidence": 0.9}, {"model": "strong"}], {"confidence": "off"},
             "quality.confidence")):
        cfg = trust_job(tmp_path, 3, cascade=cascade, quality=quality)
        r = cli_in_process("run", str(write_config(tmp_path, cfg)))
        assert r.returncode == 2 and key in r.stderr, r.stderr


def test_kill_9_in_the_second_stage_resumes_each_id_once_and_pays_no_first_stage_twice(tmp_path: Path) -> None:
    rows = 120
    sim = kill_9_sim(latency_ms=30)
    try:
        path = kill_9_config(tmp_path, sim, rows, max_concurrency=4)

        def strong_arrivals() -> int:
            return sim.call(lambda: sum(1 for e in sim.sim.service.acct.log if e.raw and b'"model":"strong"' in e.raw))
        proc = start("run", str(path), "-q")
        wait_for(lambda: strong_arrivals() >= 4 or proc.poll() is not None, what="the second stage to start")
        assert proc.poll() is None, "the run ended before the second stage could be killed"
        kill(proc)
        wait_for(lambda: sim.stats()["in_flight"] == 0, what="the simulator to go idle")
        at_kill = strong_arrivals()
        final = cli("run", str(path), "-q", timeout=300)
        assert final.returncode == 0, final.stderr
        res = assert_each_id_once(tmp_path / "out", rows)
        served = served_by_key(sim)
        stored = store_rows(tmp_path / "out")
        weak = [k for k, r in stored.items() if r["model"] == "weak"]
        assert len(weak) == rows and all(served[k] == 1 for k in weak)  # stage 1 paid once per row, ever
        assert strong_arrivals() > at_kill and set(res["cascade_stage"]) == {1, 2}
        decided_strong = res.filter(pl.col("cascade_stage") == 2)["request_key"].to_list()
        assert all(served[k] >= 1 for k in decided_strong)
    finally:
        sim.stop()


def test_a_failing_gate_exits_4_writes_the_outputs_and_publishes_nothing(tmp_path: Path, s3_bucket: str) -> None:
    audit = {"share": 0.5, "model": "strong", "min_agreement": 0.995}
    with Receiver() as hook:
        cfg = trust_job(tmp_path, 80, quality={"confidence": "logprobs", "audit": audit},
                        output={"publish": f"{s3_bucket}/published"}, notify={"webhook": hook.url})
        s = pipeline.run(cfg, quiet=True)
    assert s.exit_code == 4 and s.stop_message is not None
    out = tmp_path / "out"
    res = assert_each_id_once(out, 80)
    audited = res.filter(pl.col("audit_agrees").is_not_null())
    assert 20 < audited.height < 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 4 and summary["stopped"] == "quality_gate"
    assert summary["quality"]["gate"] == "failed" and "min_agreement 0.995" in summary["stop_message"]
    fields = summary["quality"]["audit"]["fields"]
    assert set(fields) == {"sentiment", "spam"} and fields["sentiment"]["rows"] == audited.height
    low, high = fields["sentiment"]["interval_95"]
    assert low <= fields["sentiment"]["agreement"] <= high
    assert storage.list_files(f"{s3_bucket}/published") == []
    payload = orjson.loads(hook.bodies[-1])
    assert payload["exit_code"] == 4 and payload["stop_reason"] == "quality_gate"
    assert "quality gate failed" in payload["message"]
    html = quality_section(load_run(out), "r0")  # the report's block: the gate, the stages, the audit table
    assert "quality gate failed" in html and 'data-k="r0.audit.sentiment.agree"' in html
    assert 'data-k="r0.cascade.2.rows_decided"' in html
    # A gate that holds publishes: the same answers, a lower bar.
    cfg["quality"]["audit"]["min_agreement"] = 0.3
    assert pipeline.run(cfg, quiet=True).exit_code == 0
    assert len(storage.list_files(f"{s3_bucket}/published")) == 3


def test_the_dry_run_prices_every_stage_at_worst_and_the_first_stages_escalations_as_likely(tmp_path: Path) -> None:
    cfg = trust_job(tmp_path, 60, quality={"confidence": "logprobs", "audit": {"share": 0.5, "model": "auditor"}},
                    prices={**PRICES, "auditor": {"input_per_m": 1.0, "output_per_m": 1.0}})
    path = write_config(tmp_path, cfg)
    (tmp_path / "alone").mkdir()
    alone = write_config(tmp_path / "alone", {**cfg, "cascade": None, "quality": {"confidence": "logprobs"},
                                              "endpoint": {**cfg["endpoint"], "model": "weak"}})
    before = json.loads(cli_in_process("run", str(path), "--dry-run", "--json").stdout)
    weak_only = json.loads(cli_in_process("run", str(alone), "--dry-run", "--json").stdout)
    strong_out = before["output_tokens"]["max"] * 10.0 / 1e6
    assert before["cost_usd"]["max"] > weak_only["cost_usd"]["max"] + strong_out
    assert before["cost_usd"]["likely"] is None
    text = cli_in_process("run", str(path), "--dry-run").stdout
    assert "cascade weak (>= 0.9) -> strong" in text and "audit: 50.0% of the rows also answered by auditor" in text
    # Once the first stage has answered (a run stopped by its budget after some rows), the likely case is known.
    pipeline.run(cfg, quiet=True)
    after = json.loads(cli_in_process("run", str(path), "--dry-run", "--json", "--set", "output.dir=" +
                                      str(tmp_path / "out")).stdout)
    assert after["requests"] == 0
    text = cli_in_process("run", str(path), "--dry-run").stdout
    assert "go on (of 60 first-stage answers in this job)" in text


def test_confidence_alone_is_the_same_in_batch_mode_as_in_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, log_limit=0,
                                    batch={"validating_polls": 0, "in_progress_polls": 0, "finalizing_polls": 0}))
    sim.start()
    try:
        frames = []
        for mode in ("sync", "batch"):
            (tmp_path / mode).mkdir()
            cfg = sim_job(tmp_path / mode, sim, 30, structured={"schema": SCHEMA, "mode": "json_schema"},
                          quality={"confidence": "logprobs"}, run={"mode": mode, "progress": False},
                          batch={"poll_interval_s": 0.01, "poll_max_interval_s": 0.02})
            cfg["endpoint"]["model"] = "weak"
            assert pipeline.run(cfg, quiet=True).exit_code == 0
            frames.append(assert_each_id_once(tmp_path / mode / "out", 30).sort("rid"))
    finally:
        sim.stop()
    sync, batch = frames
    assert sync.schema["confidence_by_field"] == batch.schema["confidence_by_field"]
    assert sync["confidence"].to_list() == batch["confidence"].to_list()
    assert sync["confidence"].null_count() == 0 and sync["confidence"].min() < 0.9


def test_votes_as_separate_requests_for_endpoints_without_n(tmp_path: Path) -> None:
    quality = {"confidence": "votes", "votes": 3, "vote_by": "requests"}
    cfg = trust_job(tmp_path, 40, quality=quality, cascade=None)
    cfg["endpoint"]["model"] = "weak"
    text = cli_in_process("run", str(write_config(tmp_path, cfg)), "--dry-run").stdout
    assert "votes: 3 requests a row and stage" in text
    s = pipeline.run(cfg, quiet=True)
    assert s.exit_code == 0 and s.requests_sent == 3 * 40
    res = assert_each_id_once(tmp_path / "out", 40)
    assert set(res["confidence"].round(4)) <= {0.3333, 0.6667, 1.0} and res["confidence"].min() < 1.0
    stored = store_rows(tmp_path / "out")
    assert res["cost_usd"].sum() == pytest.approx(sum(r["cost_usd"] for r in stored.values()), abs=1e-9)
    assert pipeline.run(cfg, quiet=True).requests_sent == 0  # every sample is an answer like any other


@pytest.mark.parametrize("quality", [{"confidence": "logprobs"}, {"confidence": "votes", "votes": 5},
                                     {"confidence": "votes", "votes": 3, "vote_by": "requests"}],
                         ids=["logprobs", "votes-n", "votes-requests"])
def test_streamed_answers_give_the_same_confidences_and_labels_as_whole_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quality: dict[str, Any]) -> None:
    """OpenAI streams logprobs per chunk (`choices[0].logprobs.content`) and n samples as interleaved
    choices; assembled, they are the whole answer's, so `params.stream: true` changes neither a row's label
    nor its confidence."""
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(flavor="openai", accuracy=ACCURACY, log_limit=0, stream_chunk_chars=(1, 4)))
    sim.start()
    try:
        frames = []
        for stream in (False, True):
            (tmp_path / str(stream)).mkdir()
            cfg = sim_job(tmp_path / str(stream), sim, 40, structured={"schema": SCHEMA, "mode": "json_schema"},
                          quality=quality, run={"progress": False})
            cfg["endpoint"]["model"] = "weak"
            cfg["params"] = {"stream": stream}
            if quality["confidence"] == "logprobs":
                cfg["params"]["top_logprobs"] = 3   # quality.confidence asks for the logprobs themselves
            summary = pipeline.run(cfg, quiet=True)
            assert summary.exit_code == 0 and summary.requests_sent == 40 * quality.get("votes", 1) ** (
                quality.get("vote_by") == "requests")
            frames.append(assert_each_id_once(tmp_path / str(stream) / "out", 40).sort("rid"))
    finally:
        sim.stop()
    whole, streamed = frames
    assert "ttft_s" in streamed.columns and "ttft_s" not in whole.columns  # it really streamed
    assert streamed["confidence"].null_count() == 0 and whole["confidence"].min() < 0.9
    for column in ("output", "content", "confidence", "confidence_by_field", "completion_tokens", "logprobs"):
        if column in whole.columns:
            assert streamed[column].to_list() == whole[column].to_list(), column
