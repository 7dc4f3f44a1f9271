"""Progress on stderr: rows done of total, rows/s, tokens, cost, retries and failures, requests in flight,
a 429 pause with its remaining time and the last error.

On a terminal it is a redrawn bar (tqdm). When stderr is not a terminal (cron, a redirected log) a
bar's carriage-return frames would fill the log with noise, so a plain status line is printed every
`run.progress_interval_s` instead. The runner calls `tick()` about once a second (so a stalled run,
e.g. in a 429 pause, still shows its state) and `finish()` with the final figures, which are the
summary's, not the last frame's.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from tqdm.auto import tqdm

from ..send.stats import Stats


@dataclass
class Live:
    """What the transport and the limiter say right now (ops/figures.Tally, send/limits.Limits)."""

    in_flight: int = 0
    paused_s: float = 0.0
    last_error: str | None = None


def _in_notebook(stream: TextIO) -> bool:
    """A Jupyter kernel's stderr is no terminal, but tqdm.auto draws a widget there: a bar, not lines."""
    return stream is sys.stderr and "ipykernel" in sys.modules


def stamp() -> str:
    """Off a terminal (cron appends night after night to one file) every line says when, in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ ")


class Progress:
    def __init__(self, total: int, initial: int, *, enabled: bool, interval_s: float = 30.0,
                 live: Callable[[], Live] = Live, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.total, self.done, self.failed = total, initial, 0
        self.interval_s, self.live = interval_s, live
        self._stats: Stats | None = None
        self._start = self._last_line = time.monotonic()
        self._initial = initial
        tty = enabled and (self.stream.isatty() or _in_notebook(self.stream))
        self._bar = (
            tqdm(total=total, initial=initial, unit="row", file=self.stream, dynamic_ncols=True, mininterval=0.5,
                 smoothing=0.1, desc="labelling")
            if tty else None
        )
        self._last = 0.0

    def advance(self, rows: int, stats: Stats, failed: int) -> None:
        self.done += rows
        self.failed, self._stats = failed, stats
        if self._bar is None:
            return
        self._bar.update(rows)
        now = time.monotonic()
        if now - self._last >= 0.5:  # postfix formatting is the costly part; do it twice a second at most
            self._last = now
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def tick(self) -> None:
        """About once a second: the bar's live part, or a plain line when one is due."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix())
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._line()

    def _postfix(self) -> str:
        s, live = self._stats, self.live()
        text = ""
        if s is not None:
            text = (f"tok={s.prompt_tokens + s.completion_tokens:,} ${s.cost_usd:.4f} "
                    f"retries={sum(s.retries.values())} failed={self.failed}")
        text += f" inflight={live.in_flight}"
        if live.paused_s > 0:
            text += f" 429-pause {live.paused_s:.0f}s"
        if live.last_error:
            text += f" last={live.last_error}"
        return text.strip()

    def _line(self) -> None:
        self._last_line = now = time.monotonic()
        rate = (self.done - self._initial) / max(now - self._start, 1e-9)
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        print(f"{stamp()}labelling: {self.done:,}/{self.total:,} rows{share}, {rate:.1f} rows/s, {self._postfix()}",
              file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.enabled:
            print(stamp() + text, file=self.stream, flush=True)

    def finish(self, done: int, failed: int, stats: Stats) -> None:
        """The final figures (the summary's): rows in the outputs, this run's tokens and cost."""
        if not self.enabled:
            return
        self.done, self.failed, self._stats = done, failed, stats
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(self._postfix())
            self._bar.refresh()
        else:
            self._line()
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
