"""`retry.decide()` as a table: one row per (error, tries so far, policy, flags) -> the decision.

decide() is pure (no I/O, no clock; jitter from the injected rng), so each case states the whole
decision the dispatcher acts on: the action, the failed state, the budget it counts against and, where
the server named a wait, that wait.
"""
from __future__ import annotations

import random

import pytest

from pipeline.errors import (
    AuthError,
    BadContentError,
    EndpointGone,
    PermanentError,
    RateLimited,
    RequestError,
    RunFatalError,
    TransientError,
)
from pipeline.send.retry import Backoff, Decision, RetryPolicy, Tries, decide

POLICY = RetryPolicy(max_retries=2, max_retry_after_s=60.0, bad_content_retries=1, length_max_tokens=None)
RAISING = RetryPolicy(max_retries=2, max_retry_after_s=60.0, bad_content_retries=1, length_max_tokens=4096)


def _decide(exc: RequestError, tries: Tries, policy: RetryPolicy = POLICY, **kw: object) -> Decision:
    # A zero-width backoff makes the delay exact (0.0) wherever the server named no wait.
    return decide(exc, tries, policy, Backoff(base_s=0.0, max_s=0.0, rng=random.Random(1)), **kw)


CASES = [
    # (name, error, tries, policy, kwargs, action, state, retry_class)
    ("5xx first try retries", TransientError("boom", status=502), Tries(1, 0, 0), POLICY, {},
     "retry", None, "transient"),
    ("5xx within budget retries", TransientError("boom", status=502), Tries(2, 1, 0), POLICY, {},
     "retry", None, "transient"),
    ("5xx past max_retries fails transient", TransientError("boom", status=502), Tries(3, 2, 0), POLICY, {},
     "fail", "transient", "transient"),
    ("server wait over the cap fails transient", TransientError("busy", status=503, retry_after=61.0),
     Tries(1, 0, 0), POLICY, {}, "fail", "transient", "transient"),
    ("connect failure while the endpoint is gone stops", TransientError("refused", code="connect"),
     Tries(1, 0, 0), POLICY, {"endpoint_gone": True}, "stop", None, "transient"),
    ("connect failure out of retries with nothing connecting stops", TransientError("refused", code="connect"),
     Tries(3, 2, 0), POLICY, {"connect_failing": True}, "stop", None, "transient"),
    ("connect failure out of retries while others connect fails the row", TransientError("refused", code="connect"),
     Tries(3, 2, 0), POLICY, {"connect_failing": False}, "fail", "transient", "transient"),
    ("429 within budget pauses the client", RateLimited("slow down", status=429, retry_after=5.0),
     Tries(1, 0, 0), POLICY, {}, "retry", None, "rate_limited"),
    ("429 past max_retries fails and still pauses", RateLimited("slow down", status=429, retry_after=5.0),
     Tries(3, 2, 0), POLICY, {}, "fail", "transient", "rate_limited"),
    ("429 asking for longer than the cap stops the run", RateLimited("slow down", status=429, retry_after=3600.0),
     Tries(1, 0, 0), POLICY, {}, "stop", None, "rate_limited"),
    ("401 stops the run", AuthError("bad key", status=401), Tries(1, 0, 0), POLICY, {},
     "stop", None, None),
    ("400 fails permanent", PermanentError("bad request", status=400), Tries(1, 0, 0), POLICY, {},
     "fail", "permanent", None),
    ("400 the structured plan falls back from reshapes", PermanentError("no json_schema", status=400),
     Tries(1, 0, 0), POLICY, {"falls_back": True}, "reshape", None, None),
    ("invalid JSON first time is asked again", BadContentError("not json", reason="invalid"),
     Tries(1, 0, 0), POLICY, {}, "retry", None, "bad_content"),
    ("invalid JSON past bad_content_retries fails bad_content", BadContentError("not json", reason="invalid"),
     Tries(2, 0, 1), POLICY, {}, "fail", "bad_content", "bad_content"),
    ("our parser's own bug is never asked again", BadContentError("parser crashed", reason="parser"),
     Tries(1, 0, 0), POLICY, {}, "fail", "bad_content", None),
    ("truncated without a raise configured fails", BadContentError("cut", reason="length"),
     Tries(1, 0, 0), POLICY, {"max_tokens": 200}, "fail", "bad_content", "bad_content"),
    ("truncated below the raise reshapes with more tokens", BadContentError("cut", reason="length"),
     Tries(1, 0, 0), RAISING, {"max_tokens": 200}, "reshape", None, "bad_content"),
    ("truncated at the raise already fails", BadContentError("cut", reason="length"),
     Tries(2, 0, 1), RAISING, {"max_tokens": 4096}, "fail", "bad_content", "bad_content"),
]


@pytest.mark.parametrize(("name", "exc", "tries", "policy", "kw", "action", "state", "retry_class"), CASES,
                         ids=[c[0] for c in CASES])
def test_decide_table(name: str, exc: RequestError, tries: Tries, policy: RetryPolicy, kw: dict[str, object],
                      action: str, state: str | None, retry_class: str | None) -> None:
    d = _decide(exc, tries, policy, **kw)
    assert (d.action, d.state, d.retry_class) == (action, state, retry_class)
    if action == "stop":
        assert d.error is not None and str(d.error)
    else:
        assert d.error is None


def test_a_stop_on_connect_failures_names_the_endpoint_not_the_row() -> None:
    d = _decide(TransientError("connection refused", code="connect"), Tries(1, 0, 0), endpoint_gone=True)
    assert isinstance(d.error, EndpointGone) and "stopped answering" in str(d.error)


def test_a_long_429_stop_says_how_long_and_the_key_to_change() -> None:
    d = _decide(RateLimited("slow down", status=429, retry_after=3600.0), Tries(1, 0, 0))
    assert isinstance(d.error, RunFatalError)
    assert "3600s" in str(d.error) and "limits.max_retry_after_s=60" in str(d.error)


def test_the_server_wait_is_honoured_with_a_little_jitter_only() -> None:
    d = _decide(RateLimited("slow down", status=429, retry_after=5.0), Tries(1, 0, 0))
    assert d.pause_s is not None and 5.0 <= d.pause_s <= 5.0 + min(1.0, 0.1 * 5.0 + 0.05)
    t = _decide(TransientError("busy", status=503, retry_after=7.0), Tries(1, 0, 0))
    assert 7.0 <= t.delay_s <= 7.0 + min(1.0, 0.1 * 7.0 + 0.05) and t.retry_in_s == t.delay_s


def test_the_raised_max_tokens_is_the_policys() -> None:
    d = _decide(BadContentError("cut", reason="length"), Tries(1, 0, 0), RAISING, max_tokens=200)
    assert d.max_tokens == 4096 and d.retry_in_s == 0.0


def test_backoff_doubles_its_ceiling_and_caps_it() -> None:
    b = Backoff(base_s=1.0, max_s=8.0, rng=random.Random(3))
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        assert all(0.0 <= b.delay(attempt) <= ceiling for _ in range(50))
