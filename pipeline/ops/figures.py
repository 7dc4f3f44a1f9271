"""The job's figures as they happen: every attempt's outcome as the transport saw it, and a snapshot of
the run for monitoring (written by ops/metrics.py).

`ObservedTransport` wraps the transport seam and tallies each attempt's outcome by status class (2xx,
4xx, 5xx, or network for no answer at all), 429s, requests in flight, the last error and the time of
the last success: what the progress bar and the metrics need and the retry loop's stats do not hold.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError, RunFatalError
from ..send.transport import Reply, Transport


@dataclass
class Tally:
    by_class: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    rate_limited: int = 0
    last_error: str | None = None
    last_success: float | None = None   # unix time of the last 200

    def observe(self, status: int | None, error: str | None = None) -> None:
        """One attempt's outcome: its HTTP status, or None with `error` when no answer came (a batch line's
        status is the one its result line carries)."""
        if status is None:
            self.by_class["network"] += 1
            self.last_error = error
            return
        self.by_class[f"{status // 100}xx"] += 1
        if status == 200:
            self.last_success = time.time()
        elif status == 429:
            self.rate_limited += 1
            self.last_error = "429"
        elif status >= 400:
            self.last_error = f"HTTP {status}"


class ObservedTransport:
    """The same transport, counted: one place sees every attempt's outcome as it happens."""

    def __init__(self, inner: Transport, tally: Tally) -> None:
        self.inner, self.tally = inner, tally

    async def send(self, payload: bytes, *, stream: bool = False) -> Reply:
        t = self.tally
        t.in_flight += 1
        try:
            reply = await self.inner.send(payload, stream=stream)
        except (RequestError, RunFatalError) as exc:
            t.observe(None, str(getattr(exc, "code", None) or type(exc).__name__))
            raise
        finally:
            t.in_flight -= 1
        t.observe(reply.status)
        return reply

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Figures:
    """A snapshot of one run of one job, as the metrics file shows it."""

    job: str
    rows: dict[str, int]             # succeeded / failed / pending
    requests: dict[str, int]         # by status class
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    run_cost_usd: float
    job_cost_usd: float
    last_success: float | None
    started: float
    running: bool
    exit_code: int | None = None
    cached_tokens: int = 0           # of prompt_tokens, read from the provider's prompt cache this run
    cache_saved_usd: float = 0.0
    agreement: dict[str, tuple[float, float, float]] | None = None  # audit: field -> (share, low, high)


def agreement_of(quality: dict[str, Any] | None) -> dict[str, tuple[float, float, float]] | None:
    """The audit's agreement per field from a run's quality figures (write/quality.py), for the metrics."""
    fields = ((quality or {}).get("audit") or {}).get("fields") or {}
    out = {name: (f["agreement"], *f["interval_95"]) for name, f in fields.items() if f.get("agreement") is not None}
    return out or None
