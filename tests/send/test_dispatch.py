"""The retry loop, unit by unit: a Dispatcher with a scripted transport and an in-memory answer store, on
the virtual clock (tests/vclock.py), so backoffs, pauses and "the endpoint is gone" windows take no
real time and every send time is exact."""
from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import AuthError, EndpointGone, Stopped, TransientError
from pipeline.prepare.prompts import RenderedRow
from pipeline.prepare.request import RequestBuilder
from pipeline.prepare.tokens import TokenCounter
from pipeline.send import health
from pipeline.send.budget import max_cost
from pipeline.send.dispatch import Dispatcher
from pipeline.send.limits import Limits
from pipeline.vocab import Record, Request
from tests.conftest import job
from tests.fakes import MemoryAnswers, Scripted, completion
from tests.vclock import run_virtual

OK = completion({"content": "positive"})
URL = "http://scripted.invalid/v1"


def config(tmp_path: Path, **limits: Any) -> Config:
    cfg = job(tmp_path, 1, limits={"requests_per_minute": None, "max_concurrency": 4, "backoff_base_s": 1.0,
                                   "backoff_max_s": 8.0, **limits})
    cfg["endpoint"] = {"base_url": URL, "model": "openai/gpt-4-turbo"}
    del cfg["structured"]
    return load_config(cfg)


def requests(n: int) -> list[Request]:
    builder = RequestBuilder(URL, None, TokenCounter("openai/gpt-4-turbo"))
    body = {"model": "openai/gpt-4-turbo", "max_tokens": 50}
    return [builder.build(RenderedRow({**body, "messages": [{"role": "user", "content": f"row {i}"}]}, 50))
            for i in range(n)]


def dispatch(cfg: Config, transport: Scripted, n: int = 1, answers: MemoryAnswers | None = None
             ) -> tuple[Dispatcher, list[Record | BaseException]]:
    """Submit n requests at once on the virtual clock; each result is a Record or the exception raised."""
    async def scenario() -> tuple[Dispatcher, list[Record | BaseException]]:
        d = Dispatcher(cfg, transport, answers or MemoryAnswers(), Limits(cfg.limits), None, rng=random.Random(7))
        results = await asyncio.gather(*(d.submit(r) for r in requests(n)), return_exceptions=True)
        return d, results
    return run_virtual(scenario())


def scripted(*replies: Any, then: Any = OK, latency_s: float = 0.1) -> Scripted:
    """Replies in order (an exception instance is raised), then `then` for every later request."""
    queue = list(replies)

    def answer(body: dict[str, Any]) -> Any:
        reply = queue.pop(0) if queue else then
        if isinstance(reply, BaseException):
            raise reply
        return reply
    return Scripted(answer, latency_s=latency_s)


def server_error(status: int = 503) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": "busy", "code": status}}


def test_a_transient_error_is_retried_after_the_backoff(tmp_path: Path) -> None:
    fake = scripted(server_error())
    d, [record] = dispatch(config(tmp_path), fake)
    assert isinstance(record, Record) and (record.state, record.attempts) == ("ok", 2)
    assert d.stats.retries == {"transient": 1} and d.stats.requests_sent == 2
    expected = random.Random(7).uniform(0, 1.0)  # full jitter under backoff_base_s for the first retry
    assert fake.sent_at[1] - fake.sent_at[0] == pytest.approx(0.1 + expected, abs=1e-3)


def test_a_429_with_retry_after_pauses_every_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    fake = scripted((429, {"error": {"message": "slow down", "code": 429}}, {"Retry-After": "5"}))
    d, records = dispatch(config(tmp_path, max_concurrency=1), fake, n=3)
    assert all(isinstance(r, Record) and r.state == "ok" for r in records)
    assert d.stats.retries == {"rate_limited": 1}
    assert all(t >= 5.0 for t in fake.sent_at[1:])  # nobody is sent during the server's pause
    assert [r.seconds for r in caplog.records if getattr(r, "event", None) == "rate_pause"] == [5.0]


def test_a_limit_learned_from_headers_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    headers = {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "119",
               "x-ratelimit-reset-requests": "0.5s"}
    dispatch(config(tmp_path), scripted(then=(*OK, headers)), n=3)
    learned = [(r.limit, r.value, r.source) for r in caplog.records if getattr(r, "event", None) == "limit_learned"]
    assert learned == [("requests_per_minute", 120.0, "openai")]


def test_retries_run_out_into_a_transient_failure_record(tmp_path: Path) -> None:
    answers = MemoryAnswers()
    d, [record] = dispatch(config(tmp_path, max_retries=2), scripted(then=server_error(500)), answers=answers)
    assert isinstance(record, Record) and (record.state, record.attempts, record.status) == ("transient", 3, 500)
    assert answers.records[record.key] is record and d.stats.failures == {"transient": 1}


def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    fake = scripted(then=(400, {"error": {"message": "bad field", "code": 400}}))
    d, [record] = dispatch(config(tmp_path), fake)
    assert isinstance(record, Record) and (record.state, record.attempts) == ("permanent", 1)
    assert len(fake.bodies) == 1 and d.stats.retries == {}


def test_an_empty_answer_spends_the_bad_content_budget_then_fails(tmp_path: Path) -> None:
    fake = scripted(then=completion({"content": ""}))
    d, [record] = dispatch(config(tmp_path), fake)
    assert isinstance(record, Record) and (record.state, record.attempts) == ("bad_content", 2)
    # Two attempts are one retry; the second attempt's failure is a failure, not a retry.
    assert d.stats.retries == {"bad_content": 1} and d.stats.failures == {"bad_content": 1}


def test_a_fatal_reply_stops_dispatch_and_leaves_the_rest_pending(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    fake = scripted((401, {"error": {"message": "User not found.", "code": 401}}))
    d, results = dispatch(config(tmp_path, max_concurrency=1), fake, n=5)
    assert all(isinstance(r, Stopped) for r in results) and len(fake.bodies) == 1
    assert isinstance(d.fatal, AuthError) and d.stop_reason == "fatal"
    stop = [r for r in caplog.records if getattr(r, "event", None) == "stop"]
    assert len(stop) == 1 and stop[0].reason == "fatal" and "User not found" in stop[0].getMessage()


def test_every_failed_attempt_is_logged_as_an_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    dispatch(config(tmp_path, max_retries=1), scripted(then=server_error(502)))
    events = [(r.attempt, r.status, r.error_class, r.retry_in_s is None) for r in caplog.records
              if getattr(r, "event", None) == "attempt_failed"]
    assert events == [(1, 502, "transient", False), (2, 502, "transient", True)]
    key = next(r.key for r in caplog.records if getattr(r, "event", None) == "attempt_failed")
    assert len(key) == 64 and "row 0" not in caplog.text  # the request key, never the prompt


def test_the_concurrency_slot_is_held_until_the_answer_is_committed(tmp_path: Path) -> None:
    answers = MemoryAnswers(commit_delay_s=1.0)
    fake = scripted(latency_s=0.5)
    dispatch(config(tmp_path, max_concurrency=1), fake, n=3, answers=answers)
    # Request i+1 goes out only after answer i is committed, not when its reply arrived.
    assert fake.sent_at == pytest.approx([0.0, 1.5, 3.0], abs=1e-3)
    assert answers.committed_at == pytest.approx([1.5, 3.0, 4.5], abs=1e-3)


def refused() -> TransientError:
    return TransientError(f"cannot connect to {URL}: [Errno 111] Connect call failed", code="connect")


def test_an_endpoint_that_never_answers_stops_the_run_within_seconds(tmp_path: Path) -> None:
    answers = MemoryAnswers()
    fake = scripted(then=refused(), latency_s=0.0)
    d, results = dispatch(config(tmp_path, max_concurrency=2), fake, n=10, answers=answers)
    assert isinstance(d.fatal, EndpointGone) and "scripted.invalid" in str(d.fatal)
    assert "the endpoint stopped answering" in str(d.fatal) and "Connect call failed" in str(d.fatal)
    assert all(isinstance(r, Stopped) for r in results) and not answers.records  # pending, none failed
    assert len(fake.bodies) <= health.FIRST_CONTACT_MAX_ATTEMPTS + 2  # + the other request then in flight
    assert fake.sent_at[-1] <= health.FIRST_CONTACT_MAX_S


def test_a_single_request_that_cannot_connect_stops_after_a_few_seconds(tmp_path: Path) -> None:
    fake = scripted(then=refused(), latency_s=0.0)
    d, [result] = dispatch(config(tmp_path, max_concurrency=1), fake)
    assert isinstance(result, Stopped) and isinstance(d.fatal, EndpointGone)
    assert health.FIRST_CONTACT_MIN_S <= fake.sent_at[-1] <= health.FIRST_CONTACT_MAX_S
    assert health.FIRST_CONTACT_ATTEMPTS <= len(fake.bodies) <= 6


def test_an_endpoint_that_goes_away_mid_run_stops_with_the_rest_pending(tmp_path: Path) -> None:
    answers = MemoryAnswers()
    fake = scripted(OK, OK, OK, then=refused(), latency_s=0.0)
    cfg = config(tmp_path, max_concurrency=1, max_retries=100)
    d, results = dispatch(cfg, fake, n=20, answers=answers)
    assert [r.state for r in results[:3] if isinstance(r, Record)] == ["ok", "ok", "ok"]
    assert all(isinstance(r, Stopped) for r in results[3:]) and len(answers.records) == 3
    assert isinstance(d.fatal, EndpointGone)
    # Stopped once nothing had connected for the window, not before, and not after a retry too many.
    first_refusal = fake.sent_at[3]
    assert health.GONE_AFTER_S <= fake.sent_at[-1] - first_refusal < health.GONE_AFTER_S + 8.0


def test_connect_failures_running_out_of_retries_stop_instead_of_failing_rows(tmp_path: Path) -> None:
    answers = MemoryAnswers()
    fake = scripted(OK, then=refused(), latency_s=0.0)
    d, results = dispatch(config(tmp_path, max_concurrency=1, max_retries=2), fake, n=5, answers=answers)
    assert isinstance(d.fatal, EndpointGone) and len(answers.records) == 1
    assert all(isinstance(r, Stopped) for r in results[1:])


def test_the_budget_holds_a_worst_case_only_while_a_request_is_sent(tmp_path: Path) -> None:
    cfg = job(tmp_path, 1, limits={"requests_per_minute": None, "max_concurrency": 4},
              prices={"openai/gpt-4-turbo": {"input_per_m": 100, "output_per_m": 100}})
    cfg["endpoint"] = {"base_url": URL, "model": "openai/gpt-4-turbo"}
    del cfg["structured"]
    req = requests(1)[0]
    worst = max_cost(req.est_prompt, req.max_tokens, load_config(cfg))  # ~(10 x 1.25 + 50) tokens at $100/M
    paid = (12 + 7) * 100 / 1e6  # what each answer costs
    cap = 3.5 * worst  # three worst cases fit at once, not four; the eighth still fits after seven answers
    assert 7 * paid + worst <= cap
    cfg["budget"] = {"max_cost_usd": cap}
    fake = scripted(latency_s=1.0)
    d, records = dispatch(load_config(cfg), fake, n=8)
    assert all(isinstance(r, Record) and r.state == "ok" for r in records) and d.fatal is None
    assert max(fake.sent_at.count(t) for t in fake.sent_at) == 3  # at most three at a time, though four slots
    assert d.budget.spent == pytest.approx(8 * paid) and d.budget.reserved == 0.0


def test_a_paid_answer_that_is_retried_is_kept_before_the_retry(tmp_path: Path) -> None:
    # An empty answer is bad content: paid for, then asked again. Its cost reaches the store before the
    # retry is sent, so a stop or a kill in between cannot make the next run's budget forget it.
    seen: list[tuple[str, float]] = []

    class Recording(MemoryAnswers):
        async def put(self, record: Record) -> None:
            seen.append((record.state, record.cost_usd))
            await super().put(record)

    fake = scripted(completion({"content": ""}))
    _, [record] = dispatch(config(tmp_path), fake, answers=Recording())
    assert isinstance(record, Record) and (record.state, record.attempts) == ("ok", 2)
    assert [state for state, _ in seen] == ["transient", "ok"]
    first, final = seen[0][1], seen[1][1]
    assert first > 0 and final == pytest.approx(2 * first)  # the final record carries both attempts' cost
