"""The Batch API's own calls (upload, create, poll, list, download, delete) and what a failed one means.

A chat request that keeps failing ends as a failure row; a call about the batches has no row to fail,
so it gets the budget a request gets, through THE retry decision (send/retry.py): a transient failure
(5xx, 429, a lost connection, a body that is not the object asked for) is tried again after a backoff,
on the next round of the driver, and when the same call has failed `limits.max_retries` times in a row
the run stops, as the sync mode stops when the endpoint stopped answering (exit 3, the call and its
status named, the batches already submitted left running). Any other answer the driver cannot use (a
4xx, a 401) stops the run at once, the same way: never exit 2, which says nothing was sent.
"""
from __future__ import annotations

import logging

from ..config import Config
from ..errors import EndpointGone, FatalReply, RunFatalError, TransientError
from ..send.retry import Backoff, RetryPolicy, Tries, decide

log = logging.getLogger("pipeline")


def describe(call: str, exc: BaseException) -> str:
    """"POST /files answered HTTP 500: …" / "GET /batches failed (connect): …"."""
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(status, int):
        return f"{call} answered HTTP {status}: {message}"
    code = getattr(exc, "code", None)
    return f"{call} failed{f' ({code})' if code else ''}: {message}"


def refused(call: str, exc: BaseException, todo: str, *, hint: str | None = None) -> RunFatalError:
    """The error that stops the run for an answer to `call` it cannot use: the call, the status, what to do.
    A FatalReply (401, no credits) keeps its own next step."""
    if isinstance(exc, FatalReply):
        return RunFatalError(f"{describe(call, exc)}; {exc.hint}", hint=exc.hint)
    return RunFatalError(f"{describe(call, exc)}; {todo}", hint=hint)


class Calls:
    """Consecutive transient failures per call, and how long to wait before trying again."""

    def __init__(self, cfg: Config, backoff: Backoff) -> None:
        self.policy = RetryPolicy.of(cfg)
        self.backoff = backoff
        self._failures: dict[str, int] = {}
        self.wait_s: float | None = None  # set by a failure this round: try again after this long

    @property
    def failing(self) -> bool:
        return bool(self._failures)

    def ok(self, call: str) -> None:
        self._failures.pop(call, None)

    def failed(self, call: str, exc: TransientError, *, shown: str | None = None) -> RunFatalError | None:
        """Count a transient failure of `call` (`shown`: the same call with its ids, for messages); the
        error to stop the run with when the call's retries ran out."""
        n = self._failures.get(call, 0)
        decision = decide(exc, Tries(attempts=n + 1, transient=n), self.policy, self.backoff)
        self._failures[call] = n + 1
        shown = shown or call
        retry_in = decision.retry_in_s
        log.warning("%s; %s", describe(shown, exc),
                    f"trying again in {retry_in:.1f}s" if retry_in is not None else "giving up",
                    extra={"event": "batch_call_failed", "call": call, "status": exc.status, "attempt": n + 1,
                           "error_class": exc.error_class, "retry_in_s": retry_in})
        if decision.action == "retry":
            self.wait_s = max(self.wait_s or 0.0, retry_in or 0.0)
            return None
        if decision.error is not None:  # a server wait longer than limits.max_retry_after_s
            return RunFatalError(f"{shown}: {decision.error}", hint=decision.error.hint)
        return EndpointGone(
            f"the endpoint's Batch API stopped answering: {describe(shown, exc)} ({n + 1} attempts in a row "
            f"failed, limits.max_retries={self.policy.max_retries}); batches already submitted keep running at "
            "the provider", hint="check the endpoint (its status page, endpoint.base_url), then re-run the same "
                                 "command to resume")

    def take_wait(self) -> float | None:
        wait, self.wait_s = self.wait_s, None
        return wait
