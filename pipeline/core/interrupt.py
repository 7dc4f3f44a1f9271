"""Ctrl-C and SIGTERM for one run, also when triggered from another thread (a notebook's Ctrl-C).

First: stop dispatching and let requests in flight finish within the grace period, then write the
outputs for what is done. Second (or when the grace period is over): abort the requests in flight now;
answers already received are still committed (the store's pending group commit runs on cancellation
too), so the store stays consistent. Signal handlers are installed only in the main thread (the event
loop can only handle signals there) and the previous handlers are put back afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Protocol

log = logging.getLogger("pipeline")


class Stoppable(Protocol):
    def stop(self, reason: str = "interrupted") -> None: ...

    def abort(self) -> None: ...


class Notice(Protocol):
    enabled: bool

    def note(self, text: str) -> None: ...


class Interrupt:
    def __init__(self) -> None:
        self.hits = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Stoppable | None = None
        self._notice: Notice | None = None
        self._grace_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._previous: dict[int, Any] = {}

    def attach(self, engine: Stoppable, notice: Notice, grace_s: float, *, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine, self._notice, self._grace_s = engine, notice, grace_s
        if signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                self._loop.add_signal_handler(sig, self.trigger)
        if self.hits:  # Ctrl-C came while the job was still starting
            self._apply(self.hits)

    def trigger(self) -> None:
        """Called on the run's event loop (signal handler)."""
        self.hits += 1
        if self._engine is not None:
            self._apply(self.hits)

    def trigger_threadsafe(self) -> None:
        """Called from any thread; before the run is attached, it is remembered and applied on attach."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.hits += 1
            return
        try:
            loop.call_soon_threadsafe(self.trigger)
        except RuntimeError:  # the loop closed meanwhile: the run is over
            pass

    def _apply(self, hits: int) -> None:
        assert self._engine is not None and self._notice is not None and self._loop is not None
        self._engine.stop("interrupted")
        if hits == 1:
            text = (f"stopping: finishing requests in flight (up to {self._grace_s:g}s); "
                    "Ctrl-C again to stop now")
            if self._notice.enabled:
                self._notice.note(text)
            else:
                log.warning("%s", text)
            self._timer = self._loop.call_later(self._grace_s, self._engine.abort)
        else:
            self._engine.abort()

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            for sig, previous in self._previous.items():
                self._loop.remove_signal_handler(sig)
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._engine = self._notice = None
