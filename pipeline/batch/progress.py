"""The waiting run's progress bar: lines finished at the provider, from the batches' request_counts."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from .client import TERMINAL


class BatchBar:
    """Progress of the batches at the provider, from their request_counts."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._done: dict[int, tuple[int, int]] = {}

    def show(self, chunk: int, status: str, counts: dict[str, Any], lines: int) -> None:
        finished = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        self._done[chunk] = (finished if status not in TERMINAL else lines, lines)
        done = sum(d for d, _ in self._done.values())
        total = sum(t for _, t in self._done.values())
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, unit="line", file=sys.stderr, dynamic_ncols=True, desc="batches")
        self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(f"chunk {chunk}: {status}", refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
