"""Runs that must stop (exit 3, resumable, the rest pending) and runs that must not, over real HTTP:
a fatal code in the middle of a stream, an endpoint that cannot be reached or goes away, the budget."""
from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest

import pipeline
from pipeline.config import load_config
from pipeline.errors import TransientError
from pipeline.send.transport import HttpTransport
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job

FAST = {"requests_per_minute": None, "backoff_base_s": 0.01, "backoff_max_s": 0.05}


# -- one classifier: a mid-stream error means what the same code means anywhere -------------------

@pytest.mark.parametrize("flavor,status,says", [
    ("openrouter", 401, "HTTP 401"), ("openrouter", 402, "HTTP 402"), ("openrouter", 403, "HTTP 403"),
    ("openai", 402, "Insufficient credits"),  # OpenAI's body: code insufficient_quota
])
def test_a_fatal_code_in_the_middle_of_a_stream_stops_the_run(tmp_path: Path, flavor: str, status: int,
                                                              says: str) -> None:
    cfg = job(tmp_path, 6, sim={"flavor": flavor, "fault_plan": [{"requests": "2", "fault": "stream_error",
                                                                   "status": status}]},
              params={"stream": True, "max_tokens": 200, "temperature": 0}, limits={"max_concurrency": 1, **FAST})
    s = pipeline.run(cfg, quiet=True)
    assert (s.exit_code, s.stopped, s.failed, s.retries) == (3, "fatal", 0, {})
    assert s.succeeded == 1 and s.pending == 5
    assert "error in the middle of the stream" in (s.stop_message or "") and says in (s.stop_message or "")


def test_a_transient_code_in_the_middle_of_a_stream_is_retried(tmp_path: Path) -> None:
    cfg = job(tmp_path, 4, sim={"fault_plan": [{"requests": "2", "fault": "stream_error", "status": 502}]},
              params={"stream": True, "max_tokens": 200, "temperature": 0}, limits={"max_concurrency": 1, **FAST})
    s = pipeline.run(cfg, quiet=True)
    assert (s.exit_code, s.succeeded, s.retries) == (0, 4, {"transient": 1})


# -- the endpoint cannot be reached, or goes away ----------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable(tmp_path: Path, base_url: str) -> dict[str, Any]:
    cfg = job(tmp_path, 50, limits={"max_concurrency": 8, **FAST})
    cfg["endpoint"] = {"base_url": base_url, "model": "openai/gpt-4-turbo", "api_key_env": "STOPS_TEST_KEY"}
    return cfg


def test_a_closed_port_stops_the_run_naming_host_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOPS_TEST_KEY", "sk-test")
    port = closed_port()
    s = pipeline.run(unreachable(tmp_path, f"http://127.0.0.1:{port}/v1"), quiet=True)
    assert (s.exit_code, s.stopped, s.failed, s.pending) == (3, "fatal", 0, 50)
    assert f"the endpoint stopped answering: cannot connect to http://127.0.0.1:{port}/v1" in (s.stop_message or "")
    assert "Connect call failed" in (s.stop_message or "") and "endpoint.base_url" in (s.next_step or "")
    assert s.requests_sent <= 20


def test_a_connection_failure_keeps_its_cause(tmp_path: Path) -> None:
    async def send() -> None:
        transport = HttpTransport(f"http://127.0.0.1:{closed_port()}/v1", "sk-test")
        try:
            await transport.send(b"{}")
        finally:
            await transport.close()

    with pytest.raises(TransientError) as info:
        asyncio.run(send())
    assert info.value.code == "connect" and isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


class NoSuchName(aiohttp.abc.AbstractResolver):
    """Resolves nothing, as a DNS server that does not know the name: no query leaves the machine."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        self.asked.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


def test_a_name_that_does_not_resolve_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOPS_TEST_KEY", "sk-test")
    url = "https://llm.nonexistent.invalid/v1"
    resolver = NoSuchName()
    transport = HttpTransport(url, "sk-test", resolver=resolver)
    s = asyncio.run(pipeline.run_async(load_config(unreachable(tmp_path, url)), transport=transport, quiet=True))
    assert (s.exit_code, s.stopped, s.failed, s.pending) == (3, "fatal", 0, 50)
    assert "the endpoint stopped answering" in (s.stop_message or "") and url in (s.stop_message or "")
    assert "Name or service not known" in (s.stop_message or "")
    assert set(resolver.asked) == {"llm.nonexistent.invalid"}


def test_an_endpoint_that_dies_mid_run_leaves_the_rest_pending(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOPS_TEST_KEY", "sk-test")
    sim = SimulatorThread(SimConfig(latency_ms=5))
    url = sim.start()
    died = threading.Event()

    def kill_after(n: int) -> None:
        while sim.stats()["requests"] < n:
            threading.Event().wait(0.005)
        sim.stop()
        died.set()

    killer = threading.Thread(target=kill_after, args=(30,), daemon=True)
    killer.start()
    cfg = job(tmp_path, 400, limits={"max_concurrency": 4, "max_retries": 3, **FAST})
    cfg["endpoint"] = {"base_url": url, "model": "openai/gpt-4-turbo", "api_key_env": "STOPS_TEST_KEY"}
    try:
        s = pipeline.run(cfg, quiet=True)
        killer.join(timeout=30)
    finally:
        if not died.is_set():
            sim.stop()
    assert died.is_set()
    assert (s.exit_code, s.stopped, s.failed) == (3, "fatal", 0)
    assert s.succeeded >= 26 and s.pending == 400 - s.succeeded  # none burnt as failed: all resumable
    assert "the endpoint stopped answering" in (s.stop_message or "")


# -- the budget ----------------------------------------------------------------------------------------

def budget_job(tmp_path: Path, cap: float) -> dict[str, Any]:
    """40 requests that cost ~$0.28 together, each worst case ~$0.108 (max_tokens 2000 at $50/M)."""
    return job(tmp_path, 40, sim={"flavor": "openai"}, params={"temperature": 0, "max_tokens": 2000},
               limits={"max_concurrency": 8, **FAST}, budget={"max_cost_usd": cap},
               prices={"openai/gpt-4-turbo": {"input_per_m": 50, "output_per_m": 50}})


def test_a_budget_the_job_fits_in_runs_to_the_end_in_one_run(tmp_path: Path) -> None:
    s = pipeline.run(budget_job(tmp_path, 0.75), quiet=True)
    assert (s.exit_code, s.succeeded, s.stopped) == (0, 40, None)
    assert 0.25 < s.cost_usd <= 0.75
    # Reserving every queued request's worst case (40 x ~$0.108) would have stopped it at once.


def test_a_job_over_budget_stops_within_one_worst_case_of_the_cap(tmp_path: Path) -> None:
    worst = (150 * 1.25 + 2000) * 50 / 1e6  # a generous bound on one request's reserved worst case
    s = pipeline.run(budget_job(tmp_path, 0.15), quiet=True)
    assert (s.exit_code, s.stopped, s.failed) == (3, "budget", 0) and s.pending > 0
    assert 0.15 - worst <= s.cost_usd <= 0.15
    assert "budget.max_cost_usd=$0.15" in (s.stop_message or "")
