"""OpenRouter's generation records (`GET /generation?id=`): what each billed answer cost, kept compactly.

A record becomes visible `generation_delay_s` after the answer, as OpenRouter answers "not found" right
after completion; the oldest records are dropped beyond a fixed count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from .answer import Answer
from .responses import Meta

_GENERATIONS_KEPT = 100_000


class Generations:
    def __init__(self) -> None:
        # A compact tuple per generation; the JSON is built only when asked for.
        self.records: OrderedDict[str, tuple[Any, ...]] = OrderedDict()

    def add(self, meta: Meta, answer: Answer, cost: float, streamed: bool, ready_at: float) -> None:
        self.records[meta.id] = (meta.model, meta.provider, meta.created, cost, answer.prompt_tokens,
                                 answer.completion_tokens, answer.cached_tokens, answer.finish_reason, streamed,
                                 ready_at)
        if len(self.records) > _GENERATIONS_KEPT:
            self.records.popitem(last=False)

    def get(self, gen_id: str) -> dict[str, Any] | None:
        record = self.records.get(gen_id)
        if record is None or time.monotonic() < record[-1]:
            return None  # unknown, or "not ready yet" as OpenRouter answers right after completion
        model, provider, created, cost, prompt, completion, cached, finish, streamed, _ready = record
        return {"id": gen_id, "model": model, "provider_name": provider, "total_cost": cost, "usage": cost,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                "tokens_prompt": prompt, "tokens_completion": completion, "native_tokens_prompt": prompt,
                "native_tokens_completion": completion, "native_tokens_reasoning": 0, "native_tokens_cached": cached,
                "finish_reason": finish, "native_finish_reason": finish, "streamed": streamed, "cancelled": False,
                "is_byok": False, "upstream_inference_cost": None, "cache_discount": None, "latency": 0,
                "generation_time": 0}
