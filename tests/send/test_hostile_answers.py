"""Issue 19 items 1 and 2: a 200 without choices is a bad answer (not a network fault), and a server's
usage is untrusted input (non-numeric, past 64 bits, negative): the paid answer is kept, the books stay
honest, and the log says what was not trusted. Against a small hostile server on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.config import load_config
from pipeline.send.budget import Budget, read_usage
from tests.conftest import job
from tests.hostile import HostileServer, completion
from tests.support import outputs

ANSWER = json.dumps({"sentiment": "positive", "score": 4})
KEY_ENV = "HOSTILE_TEST_KEY"


def hostile_job(tmp_path: Path, server: HostileServer, rows: int, **sections: Any) -> dict[str, Any]:
    cfg = job(tmp_path, rows, **sections)
    cfg["endpoint"] = {"base_url": server.url, "model": "openai/gpt-4-turbo", "api_key_env": KEY_ENV}
    return cfg


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-hostile-test-key")


def log_events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "pipeline.log").read_text().splitlines()]


def test_a_200_without_choices_is_a_bad_answer_with_a_small_budget_then_a_failure_row(tmp_path: Path) -> None:
    empty = completion("", choices=[], usage={"prompt_tokens": 40, "completion_tokens": 0, "cost": 0.0004})
    with HostileServer(lambda n, body: (200, empty)) as server:
        cfg = hostile_job(tmp_path, server, 3, limits={"max_concurrency": 1})
        s = pipeline.run(cfg)
        # One try and the bad-content budget's two retries per row; never the 7 paid attempts of a transient.
        assert (s.exit_code, s.failed, server.requests) == (1, 3, 9)
        _, failed = outputs(tmp_path / "out")
        assert set(failed["error_class"]) == {"bad_content"}
        assert all("no choices" in m for m in failed["message"])
        assert s.cost_usd == pytest.approx(9 * 0.0004)  # every paid attempt counted
        again = pipeline.run(cfg)  # a plain re-run does not pay for them again
        assert (again.exit_code, server.requests) == (1, 9)
        retried = pipeline.run(cfg, retry_failed=True)  # --retry-failed asks again
        assert (retried.exit_code, server.requests) == (1, 18)


def test_an_answer_with_unreadable_usage_is_stored_not_a_crash(tmp_path: Path) -> None:
    usages = [{"prompt_tokens": "lots", "completion_tokens": 12},
              {"prompt_tokens": 10**30, "completion_tokens": 18446744073709551615},
              {"prompt_tokens": 30, "completion_tokens": -7, "prompt_tokens_details": {"cached_tokens": "x"}},
              {"prompt_tokens": [1], "completion_tokens": {"a": 1}, "cost": "free"}]
    with HostileServer(lambda n, body: (200, completion(ANSWER, usage=usages[(n - 1) % 4]))) as server:
        s = pipeline.run(hostile_job(tmp_path, server, 8, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, server.requests) == (0, 8, 8)  # each paid answer used, none asked twice
    res, _ = outputs(tmp_path / "out")
    assert res["prompt_tokens"].min() > 0 and res["prompt_tokens"].max() < 1000  # our own count instead
    assert res["completion_tokens"].min() >= 0 and res["completion_tokens"].max() < 1000
    assert res["cost_usd"].min() > 0  # the table price instead of "free"
    notes = [e for e in log_events(tmp_path / "out") if e["event"] == "usage_untrusted"]
    assert len(notes) == 8 and "usage.prompt_tokens 'lots' is not a token count" in notes[0]["msg"]
    import sqlite3
    with sqlite3.connect(tmp_path / "out" / "store.sqlite") as db:
        stored = [r[0] for r in db.execute("SELECT usage_note FROM responses")]
    assert len(stored) == 8 and all(stored)  # what was not trusted, kept with each answer


def test_a_negative_cost_never_lowers_the_spend_and_the_budget_still_stops(tmp_path: Path) -> None:
    answer = completion(ANSWER, usage={"prompt_tokens": 60, "completion_tokens": 100, "cost": -0.5})
    with HostileServer(lambda n, body: (200, answer)) as server:
        s = pipeline.run(hostile_job(tmp_path, server, 30, budget={"max_cost_usd": 0.01},
                                     limits={"max_concurrency": 1}))
    # Priced from the table ($10/M in, $30/M out): ~$0.0036 an answer, so a $0.01 budget stops after a few.
    assert s.exit_code == 3 and s.stopped == "budget" and 0 < server.requests < 10
    assert s.cost_usd == pytest.approx(server.requests * (60 * 10 + 100 * 30) / 1e6)
    res, _ = outputs(tmp_path / "out")
    assert res["cost_usd"].min() > 0


def test_negative_usage_never_refills_the_tokens_bucket_nor_lowers_the_spend(tmp_path: Path) -> None:
    cfg = load_config(job(tmp_path, 1))
    usage = read_usage(completion(ANSWER, usage={"prompt_tokens": -100000, "completion_tokens": -5}), cfg,
                       est_prompt=57)
    assert (usage.prompt_tokens, usage.completion_tokens) == (57, (len(ANSWER) + 3) // 4)
    assert usage.note and "-100000" in usage.note
    budget = Budget(1.0)
    budget.charge(-0.5)
    assert budget.spent == 0.0


def test_batch_lines_without_choices_get_the_bad_content_budget_not_seven_resubmissions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_simulator import SimConfig
    from pipeline_simulator.thread import SimulatorThread
    from tests.support import TEST_KEY_ENV, sim_job

    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    sim = SimulatorThread(SimConfig(seed=7, log_limit=0, batch={"line_rate_no_choices": 1.0}))
    sim.start()
    try:
        cfg = sim_job(tmp_path, sim, 4, run={"mode": "batch", "progress": False},
                      batch={"poll_interval_s": 0.001, "poll_max_interval_s": 0.01},
                      structured={"bad_content_retries": 1})
        s = pipeline.run(cfg)
        submitted = sim.stats()["batch"]["lines_submitted"]
    finally:
        sim.stop()
    assert (s.exit_code, s.failed) == (1, 4)
    assert submitted == 8  # each line twice (one retry), not the transient budget's seven times
    _, failed = outputs(tmp_path / "out")
    assert set(failed["error_class"]) == {"bad_content"} and s.cost_usd > 0  # billed lines are counted
