"""Accounting for tests: counters, peaks over sliding 60-s windows, and a bounded request log.

Secrets never enter the log: credential headers are stored only as "present"/"absent".
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson

WINDOW_S = 60.0
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "proxy-authorization", "cookie"})


def redact_headers(headers: Any) -> tuple[tuple[str, str], ...]:
    kept = [(str(k), str(v)) for k, v in headers.items() if k.lower() not in _SECRET_HEADERS]
    kept.append(("Authorization", "present" if headers.get("Authorization") else "absent"))
    return tuple(kept)


class LogEntry:
    """One request in the log, kept compact (raw body bytes, header pairs); ``as_dict`` expands it."""

    __slots__ = ("digest", "fault", "headers", "method", "n", "path", "raw", "size", "status", "time")

    def __init__(self, n: int, when: float, method: str, path: str, headers: tuple[tuple[str, str], ...]) -> None:
        self.n = n
        self.time = when
        self.method = method
        self.path = path
        self.headers = headers
        self.raw: bytes | None = None
        self.size = 0
        self.digest: bytes | None = None
        self.status: int | str | None = None
        self.fault: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: Any = None
        if self.raw is not None:
            try:
                body = orjson.loads(self.raw)
            except orjson.JSONDecodeError:
                body = None
        elif self.size:
            body = {"_omitted_bytes": self.size}
        return {"n": self.n, "time": self.time, "method": self.method, "path": self.path,
                "headers": dict(self.headers), "body": body,
                "body_sha256": self.digest.hex() if self.digest is not None else None,
                "status": self.status, "fault": self.fault}


class Accounting:
    def __init__(self, log_limit: int, track_bodies: bool) -> None:
        self.track_bodies = track_bodies
        self.requests = 0
        self.other_requests = 0
        self.by_status: dict[str, int] = {}
        self.by_fault: dict[str, int] = {}
        self.served_by_body: dict[bytes, int] = {}  # raw sha256 digests; hex only in snapshots
        self.in_flight = 0
        self.max_concurrency = 0
        self.streams = 0
        self._arrivals: deque[float] = deque()
        self.peak_rpm = 0
        self._token_window: deque[tuple[float, int]] = deque()
        self._token_sum = 0
        self.peak_tpm = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self.log: deque[LogEntry] = deque(maxlen=log_limit)

    def arrive(self, now: float) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_concurrency = max(self.max_concurrency, self.in_flight)
        window = self._arrivals
        while window and now - window[0] >= WINDOW_S:
            window.popleft()
        window.append(now)
        self.peak_rpm = max(self.peak_rpm, len(window))

    def leave(self) -> None:
        self.in_flight -= 1

    def fault(self, name: str) -> None:
        self.by_fault[name] = self.by_fault.get(name, 0) + 1

    def status(self, key: str) -> None:
        self.by_status[key] = self.by_status.get(key, 0) + 1

    def bill(self, arrived: float, prompt: int, completion: int, cost: float) -> None:
        """Count a billed response's tokens against the window of its arrival time."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += cost
        window = self._token_window
        while window and arrived - window[0][0] >= WINDOW_S:
            self._token_sum -= window.popleft()[1]
        window.append((arrived, prompt + completion))
        self._token_sum += prompt + completion
        self.peak_tpm = max(self.peak_tpm, self._token_sum)

    def served(self, body_digest: bytes) -> None:
        if self.track_bodies:
            self.served_by_body[body_digest] = self.served_by_body.get(body_digest, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        # dict()/list() copies run in C under the GIL, so a reader in another thread gets a
        # consistent copy even while the event loop keeps serving.
        served = dict(self.served_by_body)
        return {
            "requests": self.requests,
            "other_requests": self.other_requests,
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
            "served_by_body": {k.hex(): v for k, v in served.items()},
            "max_concurrency": self.max_concurrency,
            "in_flight": self.in_flight,
            "peak_rpm": self.peak_rpm,
            "peak_tpm": self.peak_tpm,
            "streams": self.streams,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "total": self.prompt_tokens + self.completion_tokens},
            "cost_usd": round(self.cost_usd, 10),
        }
