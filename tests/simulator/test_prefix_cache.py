"""The simulator's prompt cache (automatic prefixes as OpenAI reports them, Anthropic-style breakpoints)
and its per-model prices."""
from __future__ import annotations

from typing import Any

import pytest

from pipeline_simulator import Price, SimConfig
from pipeline_simulator.prefix_cache import PrefixCache
from pipeline_simulator.pricing import FALLBACK, list_price

SHARED = "x" * 4 * 1300  # 1,300 simulator tokens


def body(row: str, model: str = "openai/gpt-4o-mini", mark: bool = False) -> dict[str, Any]:
    if mark:
        content: Any = [{"type": "text", "text": SHARED, "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": row}]
    else:
        content = SHARED + row
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def test_automatic_prefixes_are_cached_in_steps_of_128_from_1024() -> None:
    cache = PrefixCache()
    assert cache.use("openai/gpt-4o-mini", body("a" * 800), 1500) == (0, 0)  # first sight: written, free
    cached, written = cache.use("openai/gpt-4o-mini", body("b" * 800), 1500)
    assert written == 0 and cached == 1280  # 1,300 shared tokens -> 1,024 + 2 x 128
    assert cache.use("openai/gpt-4o", body("b" * 800, "openai/gpt-4o"), 1500) == (0, 0)  # per model
    assert cache.use("openai/gpt-4o-mini", {"model": "m", "messages": [{"role": "user", "content": "y" * 8000}]},
                     2000) == (0, 0)  # another prefix
    assert cache.use("openai/gpt-4o-mini", body("c"), 500) == (0, 0)  # under 1,024 tokens: never cached


def test_breakpoint_models_cache_only_up_to_the_mark() -> None:
    cache = PrefixCache()
    model = "anthropic/claude-3.5-sonnet"
    assert cache.use(model, body("a" * 800, model), 1500) == (0, 0)
    assert cache.use(model, body("b" * 800, model), 1500) == (0, 0)  # unmarked: nothing, however often
    read, written = cache.use(model, body("a" * 800, model, mark=True), 1500)
    assert read == 0 and written == pytest.approx(1300, abs=3)  # written once (the role header counts too)
    assert cache.use(model, body("b" * 800, model, mark=True), 1500) == (written, 0)  # then read


def test_memory_is_bounded() -> None:
    cache = PrefixCache(max_entries=10)
    for i in range(50):
        cache.use("m", {"messages": [{"role": "user", "content": f"{i:04d}" + "z" * 6000}]}, 1600)
    assert len(cache._seen) <= 10


def test_each_model_its_own_price() -> None:
    cfg = SimConfig()
    mini, turbo = cfg.price_for("openai/gpt-4o-mini"), cfg.price_for("openai/gpt-4-turbo")
    assert (mini.input_per_m, mini.output_per_m, mini.cached_input_per_m) == (0.15, 0.6, 0.075)
    assert (turbo.input_per_m, turbo.output_per_m) == (10.0, 30.0)
    sonnet = cfg.price_for("anthropic/claude-3.5-sonnet")
    assert (sonnet.cached_input_per_m, sonnet.cache_write_per_m) == (0.3, 3.75)  # the vendor's cache rates
    assert list_price("acme/unknown-model") == FALLBACK
    assert SimConfig(default_price=Price(input_per_m=1,
                                         output_per_m=2)).price_for("openai/gpt-4o-mini").input_per_m == 1
    assert SimConfig(prices={"openai/gpt-4o-mini": Price(input_per_m=3)}).price_for("openai/gpt-4o-mini").input_per_m \
        == pytest.approx(3)
