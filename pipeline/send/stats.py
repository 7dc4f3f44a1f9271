"""The run's counters, owned by one object: the dispatcher and the engine record through its methods,
the progress bar and the summary read its fields (and never anyone's internals)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    requests_sent: int = 0
    successes: int = 0
    retries: Counter[str] = field(default_factory=Counter)   # by class: transient, rate_limited, bad_content
    failures: Counter[str] = field(default_factory=Counter)  # requests recorded as failed, by state
    cache_hits: int = 0
    deduplicated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_tokens: int = 0        # prompt tokens the provider served from its cache
    cache_write_tokens: int = 0
    cache_saved_usd: float = 0.0  # what that saved against the full input price

    def sent(self) -> None:
        self.requests_sent += 1

    def answered(self) -> None:
        self.successes += 1

    def retried(self, kind: str) -> None:
        self.retries[kind] += 1

    def failed(self, state: str) -> None:
        self.failures[state] += 1

    def paid(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost_usd

    def cached(self, tokens: int, written: int, saved_usd: float) -> None:
        self.cached_tokens += tokens
        self.cache_write_tokens += written
        self.cache_saved_usd += saved_usd

    def reused(self, *, cache_hits: int = 0, deduplicated: int = 0) -> None:
        """Rows answered without a request of their own: from the shared cache, or an identical row."""
        self.cache_hits += cache_hits
        self.deduplicated += deduplicated
