"""Chaos: every fault class a provider produces, through the real runner, plus one soak run.

test_run.py already covers the plain transient / permanent / run-fatal / bad-content outcomes and
test_streaming.py the stream faults; this file covers the edges: edge timeouts, availability errors
without error.code, waits longer than we accept, 402 variants, credits running out mid-run, a bad key on
a big input, rate limits learned from headers, and the soak (measured at the simulator). How fast any
of this goes is for benchmarks/ to say; these tests assert what happened, in what order.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline
from pipeline_simulator import SimConfig, SimulatorThread
from tests.conftest import job
from tests.support import assert_each_id_once, cli_in_process, outputs

KEY_ENV = "CHAOS_TEST_KEY"


def plan(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"fault_plan": list(rules)}


@contextmanager
def serving(cfg: SimConfig) -> Iterator[tuple[SimulatorThread, str]]:
    """The simulator on its own thread (its stats and log outlive the run), and its base URL."""
    thread = SimulatorThread(cfg)
    url = thread.start()
    try:
        yield thread, url
    finally:
        thread.stop()


def arrivals(thread: SimulatorThread) -> list[float]:
    return sorted(e["time"] for e in thread.sim.log if e["path"].endswith("/chat/completions"))


def max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# -- edges of the transient class ----------------------------------------------------------------

@pytest.mark.parametrize("flavor,status", [("openrouter", 524), ("openai", 408)])
def test_edge_timeouts_are_retried(tmp_path: Path, flavor: str, status: int) -> None:
    # Requests 1-2 would take an hour; the edge gives up after 0.1 s with 524 (Cloudflare) or 408.
    sim = {"flavor": flavor, "edge_timeout_s": 0.1, **plan({"requests": "1-2", "fault": "hang"})}
    s = pipeline.run(job(tmp_path, 5, sim=sim, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 5, {"transient": 2})
    assert s.requests_sent == 7


def test_529_retry_after_is_honoured_for_that_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with serving(SimConfig(**plan({"requests": "1", "fault": "529", "retry_after": 0.3}))) as (thread, url):
        s = pipeline.run(job(tmp_path, 3, endpoint={"base_url": url, "api_key_env": KEY_ENV},
                             limits={"max_concurrency": 1}))
        log = thread.sim.log
    assert (s.exit_code, s.succeeded, s.retries) == (0, 3, {"transient": 1})
    first = log[0]
    retry = next(e for e in log[1:] if e["body_sha256"] == first["body_sha256"])
    assert retry["time"] - first["time"] >= 0.3  # the server's wait, not our 0.01-s backoff
    assert log[1]["body_sha256"] != first["body_sha256"]  # ...for that request only: the next row went first


@pytest.mark.parametrize("fault,retry_class", [("429_capacity", "rate_limited"), ("503_unavailable", "transient")])
def test_availability_errors_without_error_code_are_retried(tmp_path: Path, fault: str, retry_class: str) -> None:
    # OpenRouter's availability variant has no error.code: the HTTP status decides.
    sim = plan({"requests": "1-2", "fault": fault, "retry_after": 0.02})
    s = pipeline.run(job(tmp_path, 4, sim=sim, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 4, {retry_class: 2})


def test_model_down_without_fallbacks_is_a_retried_502(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 3, sim=plan({"requests": "1", "fault": "model_down"}),
                         limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 3, {"transient": 1})


def test_openai_slow_down_backs_off_the_whole_client(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 4, sim={"flavor": "openai", **plan({"requests": "1", "fault": "503_slow_down"})},
                         endpoint={"model": "gpt-4o"}, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 4, {"rate_limited": 1})


def test_stream_with_keepalives_between_chunks_and_string_error_codes(tmp_path: Path) -> None:
    sim = {"stream_comments_between": True, "stream_error_code": "string", "stream_split_writes": True,
           "stream_split_delay_ms": 0, **plan({"requests": "1", "fault": "stream_error"},
                                               {"requests": "2", "fault": "stream_error", "status": 429})}
    s = pipeline.run(job(tmp_path, 4, sim=sim, params={"stream": True, "max_tokens": 200},
                         limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded) == (0, 4)
    assert s.retries == {"transient": 1, "rate_limited": 1}  # "server_error" and "rate_limit_exceeded"


# -- waits longer than we accept ------------------------------------------------------------------

def test_429_asking_for_a_longer_wait_than_allowed_stops_the_run_resumably(tmp_path: Path) -> None:
    cfg = job(tmp_path, 40, sim=plan({"requests": "6-", "fault": "429", "retry_after": 3600}),
              limits={"max_concurrency": 2, "max_retry_after_s": 60})
    s = pipeline.run(cfg)
    assert (s.exit_code, s.stopped) == (3, "fatal")
    assert "limits.max_retry_after_s=60" in (s.stop_message or "") and "3600s" in (s.stop_message or "")
    assert s.failed == 0 and 4 <= s.succeeded < 40
    # Stopped at the first refusal instead of waiting to retry it: 5 answers, the refused request and
    # the one in flight with it (concurrency 2), nothing re-sent.
    assert s.requests_sent <= 5 + 2
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    resumed = pipeline.run(cfg)
    assert (resumed.exit_code, resumed.succeeded) == (0, 40)
    assert_each_id_once(tmp_path / "out", 40)


def test_503_asking_for_a_longer_wait_than_allowed_fails_only_that_row(tmp_path: Path) -> None:
    cfg = job(tmp_path, 5, sim=plan({"requests": "2", "fault": "503", "retry_after": 3600}),
              limits={"max_concurrency": 1, "max_retry_after_s": 60})
    s = pipeline.run(cfg)
    assert (s.exit_code, s.succeeded, s.failed) == (1, 4, 1)
    assert s.requests_sent == 5  # that row failed at once, never re-sent after a wait
    fail = outputs(tmp_path / "out")[1].row(0, named=True)
    assert (fail["error_class"], fail["status"], fail["attempts"]) == ("transient", 503, 1)
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    assert pipeline.run(cfg).succeeded == 5  # transient failures are retried by a plain re-run


# -- credits -------------------------------------------------------------------------------------

def test_402_with_retry_after_is_the_in_flight_budget_and_is_retried(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 4, sim=plan({"requests": "1-2", "fault": "402", "retry_after": 0.02}),
                         limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 4, {"transient": 2})


def test_credits_running_out_mid_run_stop_it_and_a_resume_with_credits_completes(tmp_path: Path) -> None:
    cfg = job(tmp_path, 60, sim={"credits_usd": 0.02, "credits_preflight": False}, limits={"max_concurrency": 4})
    s = pipeline.run(cfg)
    assert (s.exit_code, s.stopped) == (3, "fatal")
    assert "402" in (s.stop_message or "") and "add credits" in (s.next_step or "")
    assert 5 < s.succeeded < 60 and s.failed == 0 and s.pending == 60 - s.succeeded
    assert outputs(tmp_path / "out")[0].height == s.succeeded  # what was paid for is in the results already
    cfg["endpoint"]["simulator"]["credits_usd"] = 5.0
    resumed = pipeline.run(cfg)
    assert (resumed.exit_code, resumed.succeeded) == (0, 60)
    assert resumed.requests_sent == 60 - s.succeeded  # nothing paid for is asked again
    assert_each_id_once(tmp_path / "out", 60)


def test_402_that_fewer_max_tokens_would_clear_says_lower_max_tokens(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 5, sim={"credits_usd": 0.004}, params={"max_tokens": 4000}))
    assert s.exit_code == 3 and s.succeeded == 0
    assert "can only afford" in (s.stop_message or "")
    assert "lower params.max_tokens" in (s.next_step or "")


# -- a bad key on a big input --------------------------------------------------------------------

def test_401_from_the_first_request_stops_2000_rows_at_once_via_the_cli(tmp_path: Path) -> None:
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"rid": f"r{i}", "text": f"review {i}"}) + "\n" for i in range(2000)))
    cfg = {"input": {"path": str(rows), "id_column": "rid"},
           "endpoint": {"base_url": "simulator", "api_key_env": KEY_ENV, "simulator": {"api_key": "sk-the-right-one"}},
           "prompt": {"user": "Review: {{ text }}"}, "params": {"max_tokens": 50},
           "limits": {"max_concurrency": 16}, "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = cli_in_process("run", str(path), "-q", env={KEY_ENV: "sk-a-wrong-one"})
    assert p.returncode == 3, p.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["requests_sent"] <= 16 + 4  # the requests already in flight, not 2000 failures
    assert (summary["failed"], summary["pending"]) == (0, 2000)
    assert "401" in p.stderr and "endpoint.api_key_env" in p.stderr


def test_403_on_the_key_is_run_fatal_but_a_moderation_403_is_the_rows(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 500, sim=plan({"requests": "1-", "fault": "403_key"}),
                         limits={"max_concurrency": 8}))
    assert (s.exit_code, s.stopped, s.failed) == (3, "fatal", 0) and s.requests_sent <= 8 + 4


# -- learning limits from headers ----------------------------------------------------------------

@pytest.mark.parametrize("adaptive", [True, False])
def test_openai_rate_headers_teach_the_real_limit_before_any_429(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 adaptive: bool) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    # The server allows 1200/min, enforced per second (20/s); the config believes in ten times that. The
    # limit is low enough that a client slowed down by a busy machine still runs into it if it does
    # not learn (60 rows sent within 2 s are enough), which is what makes the adaptive case's few
    # refusals mean something.
    with serving(SimConfig(flavor="openai", rpm=1200, limit_burst_s=1.0)) as (thread, url):
        s = pipeline.run(job(tmp_path, 60, endpoint={"base_url": url, "api_key_env": KEY_ENV, "model": "gpt-4o"},
                             limits={"requests_per_minute": 12_000, "max_concurrency": 8, "adaptive": adaptive}))
        stats = thread.stats()
    assert s.succeeded + s.failed == 60
    refused = stats["by_status"].get("429", 0)
    if adaptive:
        assert (s.exit_code, s.succeeded) == (0, 60)
        assert refused <= 5  # arrival jitter against a per-second quantum, at most
    else:
        assert refused >= 10  # the same run that does not learn keeps running into the limit


# -- soak ----------------------------------------------------------------------------------------

SOAK_ROWS = 3000
SOAK_RPM = 24_000  # 400/s: the run is rate-bound, so the limiter is what paces it
SOAK_CONCURRENCY = 32
FAULTS = {"rate_429": 0.02, "rate_500": 0.01, "rate_502": 0.01, "rate_503": 0.01, "rate_reset": 0.005,
          "rate_malformed": 0.005, "rate_schema_invalid": 0.005}
LATENCY = {"latency_ms": 20, "latency_jitter_ms": 10, "latency_tail_prob": 0.01, "latency_tail_multiplier": 20}


def test_soak_mixed_faults_long_tail_and_an_enforced_rate_limit(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    sim = SimConfig(seed=11, rpm=SOAK_RPM, limit_burst_s=1.0, retry_after_s=0.02, track_bodies=False,
                    log_body_max_bytes=0, **LATENCY, **FAULTS)
    with serving(sim) as (thread, url):
        chaos = pipeline.run(job(tmp_path, SOAK_ROWS, endpoint={"base_url": url, "api_key_env": KEY_ENV},
                                 limits={"requests_per_minute": SOAK_RPM, "max_concurrency": SOAK_CONCURRENCY,
                                         "max_retries": 8, "backoff_base_s": 0.05, "backoff_max_s": 1.0}))
        stats, times = thread.stats(), arrivals(thread)

    # Every row ends exactly once, in results or failures.
    assert chaos.succeeded + chaos.failed == SOAK_ROWS and chaos.pending == 0
    assert_each_id_once(tmp_path / "out", SOAK_ROWS)
    assert sum(stats["by_fault"].values()) > 0.06 * SOAK_ROWS  # the faults did happen
    # The configured limits held, measured where it counts: at the server.
    per_s = SOAK_RPM / 60
    assert stats["max_concurrency"] <= SOAK_CONCURRENCY
    assert stats["peak_rpm"] <= SOAK_RPM
    for window in (1.0, 5.0):  # a second of quota at most as a burst, then the steady rate
        assert max_in_window(times, window) <= per_s * (1 + window) * 1.02 + 5
    refused = stats["by_status"].get("429", 0) - stats["by_fault"].get("429", 0)  # the server's own limit
    assert refused <= 0.01 * SOAK_ROWS
