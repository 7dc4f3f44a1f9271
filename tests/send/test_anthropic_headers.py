"""Anthropic's rate-limit headers (docs/wire.md §3.1): requests, input tokens and output tokens per minute,
each reset an RFC 3339 time. Headers as a real reply carries them (a recorded 200 from api.anthropic.com);
the wall clock is injected, the loop clock is virtual."""
from __future__ import annotations

import pytest

from pipeline.config import LimitsConfig
from pipeline.errors import RateLimited
from pipeline.models.headers import parse_rfc3339, rate_windows, retry_after
from pipeline.send.classify import classify
from pipeline.send.limits import Limits
from pipeline.send.transport import Reply
from tests.send.test_limits import dispatch_times, max_in_window
from tests.vclock import run_virtual

NOW = parse_rfc3339("2025-08-21T12:40:29Z")
assert NOW is not None

# A 200 from the Messages API (values as recorded, reset times as sent: whole seconds, UTC).
REPLY = {
    "anthropic-ratelimit-input-tokens-limit": "80000", "anthropic-ratelimit-input-tokens-remaining": "80000",
    "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-output-tokens-limit": "16000", "anthropic-ratelimit-output-tokens-remaining": "16000",
    "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:41:00Z",
    "anthropic-ratelimit-requests-limit": "1000", "anthropic-ratelimit-requests-remaining": "999",
    "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-tokens-limit": "96000", "anthropic-ratelimit-tokens-remaining": "96000",
    "anthropic-ratelimit-tokens-reset": "2025-08-21T12:40:59Z",
    "request-id": "req_011CSLsW7mFqvHHnzrKdKjAE", "content-type": "application/json",
}


def test_the_three_windows_are_read_with_their_resets_as_seconds_from_now() -> None:
    windows = {w.kind: w for w in rate_windows(REPLY, NOW)}
    # The combined tokens-* family is the most restrictive of the two now in effect, not a limit: not read.
    assert set(windows) == {"requests", "input_tokens", "output_tokens"}
    assert (windows["requests"].limit, windows["requests"].remaining, windows["requests"].reset_s) == (1000, 999, 30)
    assert (windows["input_tokens"].limit, windows["input_tokens"].reset_s) == (80000, 30)
    assert (windows["output_tokens"].limit, windows["output_tokens"].reset_s) == (16000, 31)
    assert {w.source for w in windows.values()} == {"anthropic"}
    # A reset already past counts as now; a reset that is no time is left out, the limit still read.
    later = {**REPLY, "anthropic-ratelimit-requests-reset": "soon"}
    windows = {w.kind: w for w in rate_windows(later, NOW + 60)}
    assert windows["requests"].reset_s is None and windows["requests"].limit == 1000
    assert windows["input_tokens"].reset_s == 0.0


@pytest.mark.parametrize("text, expected", [
    ("2025-08-21T12:40:59Z", 1755780059.0), ("2025-08-21T12:40:59.250Z", 1755780059.25),
    ("2025-08-21T14:40:59+02:00", 1755780059.0), ("2025-08-21T12:40:59", 1755780059.0),
    ("", None), ("6m0s", None), ("tomorrow", None), ("2025-13-01T00:00:00Z", None),
])
def test_rfc3339_times(text: str, expected: float | None) -> None:
    assert parse_rfc3339(text) == expected


def test_the_wait_after_an_anthropic_429_is_retry_after_else_the_exhausted_windows_reset() -> None:
    body = (b'{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate '
            b'limit for your organization of 16,000 output tokens per minute."}}')
    exhausted = {**REPLY, "anthropic-ratelimit-output-tokens-remaining": "0"}
    with pytest.raises(RateLimited) as info:
        classify(Reply(429, {**exhausted, "retry-after": "17"}, body, 0.2))
    assert info.value.retry_after == 17.0  # the server's own word first
    assert retry_after(exhausted, now=NOW) == 31.0  # without it: until the output window is full again
    assert retry_after(REPLY, now=NOW) is None  # nothing exhausted, nothing said: no wait


def _limits(wall: float, **kw: object) -> Limits:
    base: dict[str, object] = {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrency": 1000,
                               "burst_s": 1.0}
    return Limits(LimitsConfig(**{**base, **kw}), wall_clock=lambda: wall)


def test_the_limiter_learns_each_per_minute_limit_from_the_first_reply() -> None:
    async def scenario() -> Limits:
        lim = _limits(NOW, output_tokens_per_minute=50000)  # ours is looser than the server's: it goes down
        lim.observe(REPLY)
        return lim

    lim = run_virtual(scenario())
    assert lim.learned == {"requests": 1000, "input_tokens": 80000, "output_tokens": 16000}
    assert lim.requests is not None and lim.requests.per_minute == pytest.approx(990)
    assert lim.input_tokens is not None and lim.input_tokens.per_minute == pytest.approx(79200)
    assert lim.output_tokens is not None and lim.output_tokens.per_minute == pytest.approx(15840)
    assert lim.tokens is None  # the combined family taught nothing


def test_few_requests_left_are_spread_over_the_time_to_reset() -> None:
    async def scenario() -> list[float]:
        lim = _limits(NOW)
        lim.observe({**REPLY, "anthropic-ratelimit-requests-remaining": "20",
                     "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:39Z"})  # 20 left for 10 s
        return await dispatch_times(lim, 40)

    times = run_virtual(scenario())
    before_reset = [t for t in times if t < 10.0]
    assert 18 <= len(before_reset) <= 21  # ~2/s, not the bucket's 16.5/s
    assert max_in_window(before_reset, 1.0) <= 3
