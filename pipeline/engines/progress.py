"""The progress bar: rows done of total, rows/s, tokens, cost, retries and failures, on stderr."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from ..send.stats import Stats


class Progress:
    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = (
            tqdm(total=total, initial=initial, unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                 smoothing=0.1, desc="labelling")
            if enabled else None
        )
        self._last = 0.0

    def advance(self, rows: int, stats: Stats, failed: int) -> None:
        if self._bar is None:
            return
        self._bar.update(rows)
        now = time.monotonic()
        if now - self._last >= 0.5:  # postfix formatting is the costly part; do it twice a second at most
            self._last = now
            retries = sum(stats.retries.values())
            self._bar.set_postfix_str(
                f"tok={stats.prompt_tokens + stats.completion_tokens:,} ${stats.cost_usd:.4f} "
                f"retries={retries} failed={failed}",
                refresh=False,
            )

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
