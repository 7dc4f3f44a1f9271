"""What to do after an attempt failed: `decide(...)`, a pure function of the error and the request's
tries so far (no I/O, no clock; the jitter comes from the injected `Backoff` rng).

    retry      after `delay_s` (this request only), or after `pause_s` (the whole client: a 429)
    fail       record the request as failed (`state`: transient, permanent or bad_content)
    stop       stop the run (`error`: what to tell the user); the request stays pending
    reshape    send it again shaped otherwise: a structured-mode fallback, or a raised max_tokens

`Backoff` is exponential with full jitter, capped, and yields to the server's own wait
(`Retry-After`, `retry-after-ms`, OpenAI/OpenRouter reset headers, "try again in 9.8s") when given.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from ..config import Config
from ..errors import (
    BadContentError,
    EndpointGone,
    Fatal,
    FatalReply,
    PermanentError,
    RateLimited,
    RequestError,
    RunFatalError,
    TransientError,
)

Action = Literal["retry", "fail", "stop", "reshape"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry budgets of a run, from `limits` and `structured`."""

    max_retries: int = 6
    max_retry_after_s: float = 900.0
    bad_content_retries: int = 1
    length_max_tokens: int | None = None

    @classmethod
    def of(cls, cfg: Config) -> RetryPolicy:
        s = cfg.structured
        return cls(cfg.limits.max_retries, cfg.limits.max_retry_after_s,
                   s.bad_content_retries if s else 1, s.length_max_tokens if s else None)


@dataclass(slots=True)
class Tries:
    """One request's attempts so far, and how many failed as transient or bad content."""

    attempts: int = 0
    transient: int = 0
    bad_content: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float = 0.0                 # retry: wait this long before the next attempt
    pause_s: float | None = None         # a 429: the whole client waits this long (also when failing)
    state: str | None = None             # fail: the record's state
    error: Fatal | None = None           # stop: why
    max_tokens: int | None = None        # reshape: the raised max_tokens (None: the structured fallback)
    retry_class: str | None = None       # which retry budget this failure counts against

    @property
    def retry_in_s(self) -> float | None:
        """When the request is tried again, for the log; None when it will not be."""
        if self.action == "retry":
            return self.pause_s if self.pause_s is not None else self.delay_s
        return 0.0 if self.action == "reshape" else None


def decide(exc: RequestError, tries: Tries, policy: RetryPolicy, backoff: Backoff, *,
           max_tokens: int | None = None, falls_back: bool = False, endpoint_gone: bool = False,
           connect_failing: bool = False) -> Decision:
    """The next step after `exc` ended attempt number `tries.attempts` (counts not yet updated for it).

    `falls_back`: the structured plan stepped down to another mode for this error (PermanentError).
    `endpoint_gone`: every attempt has failed to connect for long enough. `connect_failing`: no attempt
    has connected since the current run of connect failures began."""
    if isinstance(exc, FatalReply):
        return Decision("stop", error=exc)
    if isinstance(exc, RateLimited):
        return _rate_limited(exc, tries.transient + 1, policy, backoff)
    if isinstance(exc, TransientError):
        return _transient(exc, tries.transient + 1, policy, backoff, endpoint_gone, connect_failing)
    if isinstance(exc, BadContentError):
        return _bad_content(exc, tries.bad_content + 1, policy, max_tokens)
    if isinstance(exc, PermanentError) and falls_back:
        return Decision("reshape")
    return Decision("fail", state="permanent")


def _rate_limited(exc: RateLimited, n: int, policy: RetryPolicy, backoff: Backoff) -> Decision:
    wait = exc.retry_after if exc.retry_after is not None else backoff.delay(n)
    if wait > policy.max_retry_after_s:
        # Every request would hear the same: stop (resumable) rather than pause the run for ages.
        return Decision("stop", retry_class="rate_limited", error=RunFatalError(
            f"{exc}; the server asks to wait {wait:.0f}s, more than limits.max_retry_after_s="
            f"{policy.max_retry_after_s:g}: re-run the same command after that to resume"))
    if n > policy.max_retries:
        return Decision("fail", state="transient", pause_s=wait, retry_class="rate_limited")
    return Decision("retry", pause_s=wait, retry_class="rate_limited")


def _transient(exc: TransientError, n: int, policy: RetryPolicy, backoff: Backoff, endpoint_gone: bool,
               connect_failing: bool) -> Decision:
    exhausted = n > policy.max_retries
    if exc.code == "connect" and (endpoint_gone or (exhausted and connect_failing)):
        # Out of retries while nothing connects: the endpoint is gone for every row, not for this one.
        return Decision("stop", retry_class="transient",
                        error=EndpointGone(f"the endpoint stopped answering: {exc.message}"))
    too_long = exc.retry_after is not None and exc.retry_after > policy.max_retry_after_s
    if exhausted or too_long:
        return Decision("fail", state="transient", retry_class="transient")
    return Decision("retry", delay_s=backoff.delay(n, exc.retry_after), retry_class="transient")


def _bad_content(exc: BadContentError, n: int, policy: RetryPolicy, max_tokens: int | None) -> Decision:
    if exc.reason == "parser":  # our own bug: asking again would get the same answer
        return Decision("fail", state="bad_content")
    raise_to = policy.length_max_tokens
    if exc.reason == "length":
        # Same max_tokens would be paid for the same truncation again: only retry if raised.
        if raise_to and (max_tokens or 0) < raise_to:
            return Decision("reshape", max_tokens=raise_to, retry_class="bad_content")
        return Decision("fail", state="bad_content", retry_class="bad_content")
    if n > policy.bad_content_retries:
        return Decision("fail", state="bad_content", retry_class="bad_content")
    return Decision("retry", retry_class="bad_content")


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped; the server's wait wins when it gave one."""

    base_s: float = 1.0
    max_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, server_wait: float | None = None) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 1)."""
        ceiling = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        jittered = self.rng.uniform(0, ceiling)
        if server_wait is not None:
            # Honour the server, plus a little jitter so a crowd of clients does not return at once.
            return server_wait + self.rng.uniform(0, min(1.0, 0.1 * server_wait + 0.05))
        return jittered
