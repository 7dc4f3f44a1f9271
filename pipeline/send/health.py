"""Whether the endpoint still answers: runs of connection failures, timed on the loop's clock.

Any reply at all (a 500 included) means the endpoint is there. When attempts only fail to connect
(refused, no route, the name does not resolve), the run of failures is timed from its first one:
- before the endpoint ever answered, it is gone after `FIRST_CONTACT_ATTEMPTS` failed attempts over at
  least `FIRST_CONTACT_MIN_S`, or after `FIRST_CONTACT_MAX_ATTEMPTS` whatever the time, or after
  `FIRST_CONTACT_MAX_S` whatever the count (a wrong URL or a dead host stops the run in seconds, as the
  SDKs raise, yet a server still starting gets a moment);
- after it answered, it is gone when nothing has connected for `GONE_AFTER_S` (a server that died
  mid-run stops the run with the remaining rows pending, instead of failing every one of them).
The clock is the running loop's (`loop.time()`), so tests drive it with a virtual clock.
"""
from __future__ import annotations

import asyncio
import math

FIRST_CONTACT_ATTEMPTS = 3
FIRST_CONTACT_MIN_S = 1.0
FIRST_CONTACT_MAX_ATTEMPTS = 10
FIRST_CONTACT_MAX_S = 10.0
GONE_AFTER_S = 30.0


class Reachability:
    def __init__(self) -> None:
        self.ever_answered = False
        self._failing_since = math.inf
        self._failures = 0

    @property
    def failing(self) -> bool:
        """No attempt has connected since the current run of connection failures began."""
        return self._failures > 0

    def answered(self) -> None:
        self.ever_answered = True
        self._failures = 0
        self._failing_since = math.inf

    def connect_failed(self) -> bool:
        """Count one failed connection; True when the endpoint is to be taken as gone."""
        now = asyncio.get_running_loop().time()
        if not self._failures:
            self._failing_since = now
        self._failures += 1
        span = now - self._failing_since
        if self.ever_answered:
            return span >= GONE_AFTER_S
        return span >= FIRST_CONTACT_MAX_S or self._failures >= FIRST_CONTACT_MAX_ATTEMPTS or (
            self._failures >= FIRST_CONTACT_ATTEMPTS and span >= FIRST_CONTACT_MIN_S)
