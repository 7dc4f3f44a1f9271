"""How long an answer takes, and sleeping that can be cut short when the simulator stops.

Latency has its own random stream (seeded from the config seed), so changing latency knobs
never shifts the fault sequence. ``latency_ms=0`` with no other knob means no sleep at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import orjson

from .config import SimConfig

_SHORT_SLEEP_S = 5.0  # below this a plain sleep is cheaper than racing the stop event
_SCHEMAS_REMEMBERED = 10_000


class Timing:
    def __init__(self, cfg: SimConfig, stopping: asyncio.Event) -> None:
        self.cfg = cfg
        self.stopping = stopping
        self.rng = random.Random(cfg.seed ^ 0x1A7E)
        self.seen_schemas: set[bytes] = set()
        self.active = bool(cfg.latency_ms or cfg.latency_jitter_ms or cfg.latency_per_output_token_ms
                           or cfg.new_schema_latency_ms)

    def latency(self, completion_tokens: int, body: dict[str, Any]) -> float:
        """Seconds before the answer (time to first token for streams)."""
        if not self.active:
            return 0.0
        cfg = self.cfg
        ms = cfg.latency_ms
        if cfg.latency_jitter_ms:
            ms += self.rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms)
        if cfg.latency_tail_prob and self.rng.random() < cfg.latency_tail_prob:
            ms *= cfg.latency_tail_multiplier
        ms += completion_tokens * cfg.latency_per_output_token_ms
        if cfg.new_schema_latency_ms and self._first_use_of_schema(body):
            ms += cfg.new_schema_latency_ms  # OpenAI processes a new strict schema on first use
        return max(0.0, ms) / 1000.0

    def _first_use_of_schema(self, body: dict[str, Any]) -> bool:
        fmt = body.get("response_format")
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return False
        key = hashlib.sha256(orjson.dumps(fmt.get("json_schema"), option=orjson.OPT_SORT_KEYS)).digest()
        if key in self.seen_schemas:
            return False
        if len(self.seen_schemas) < _SCHEMAS_REMEMBERED:
            self.seen_schemas.add(key)
        return True

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless the simulator stops first; False when interrupted by stop."""
        if seconds <= 0:
            return True
        if seconds < _SHORT_SLEEP_S:
            await asyncio.sleep(seconds)
            return not self.stopping.is_set()
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return False
        except TimeoutError:
            return True
