"""Cached and cache-write prompt tokens, read as each provider reports them and priced at the model's rates."""
from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import Config, load_config
from pipeline.models.prices import cache_saving, find_price, prompt_cache
from pipeline.send.budget import read_usage

# The response of OpenAI's prompt-caching guide ("Requests ... will include a cached_tokens value"):
# a chat.completion whose 2,006 prompt tokens include 1,920 read from the cache.
OPENAI_BODY: dict[str, Any] = {
    "id": "chatcmpl-AB12", "object": "chat.completion", "created": 1733000000, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
              "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_0aa8d3e20b",
}


def cfg(model: str = "openai/gpt-4o-mini", **extra: Any) -> Config:
    return load_config({"input": {"path": "in.jsonl"}, "output": {"dir": "out"}, "prompt": {"user": "{{ text }}"},
                        "endpoint": {"model": model}, **extra})


def test_openai_cached_tokens_are_read_and_priced_at_the_cached_rate() -> None:
    usage = read_usage(OPENAI_BODY, cfg())
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens) == \
        (2006, 300, 1920, 0)
    # gpt-4o-mini: $0.15 / M input, $0.075 / M cached input, $0.60 / M output.
    assert usage.cost_usd == pytest.approx((86 * 0.15 + 1920 * 0.075 + 300 * 0.60) / 1e6)
    assert usage.saved_usd == pytest.approx(1920 * (0.15 - 0.075) / 1e6)
    assert usage.table_cost_usd is None  # no usage.cost: the table price is the charge


def test_batch_answers_keep_the_cache_discount_on_the_batch_price() -> None:
    usage = read_usage(OPENAI_BODY, cfg(), batch=True)
    assert usage.cost_usd == pytest.approx((86 * 0.075 + 1920 * 0.0375 + 300 * 0.30) / 1e6)


def test_flex_is_priced_at_the_flex_rates() -> None:
    flex = cfg("openai/gpt-5-mini", params={"service_tier": "flex"})
    price = find_price(flex, "openai/gpt-5-mini")
    assert price is not None and "flex" in price.source
    assert (price.input_per_m, price.output_per_m, price.cached_input_per_m) == (0.125, 1.0, 0.0125)
    # A model without a flex price in the table: the Batch API's, as OpenAI prices Flex.
    mini = find_price(cfg(params={"service_tier": "flex"}), "openai/gpt-4o-mini")
    assert mini is not None and (mini.input_per_m, mini.output_per_m) == (0.075, 0.3)
    timeouts = cfg(params={"service_tier": "flex"}).endpoint
    assert (timeouts.timeout_s, timeouts.read_timeout_s) == (900.0, 900.0)  # flex queues: long waits are normal
    assert cfg(params={"service_tier": "flex"}, endpoint={"read_timeout_s": 30}).endpoint.read_timeout_s == 30


def test_openrouter_cache_writes_and_its_reported_cost() -> None:
    body = {"model": "anthropic/claude-3.5-sonnet", "provider": "Anthropic", "choices": OPENAI_BODY["choices"],
            "usage": {"prompt_tokens": 1500, "completion_tokens": 10, "total_tokens": 1510, "cost": 0.0123,
                      "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1400}}}
    usage = read_usage(body, cfg("anthropic/claude-3.5-sonnet"))
    assert (usage.cached_tokens, usage.cache_write_tokens) == (0, 1400)
    assert usage.cost_usd == 0.0123  # the endpoint's own charge wins
    # The table's price of the same usage (writes at $3.75 / M) is kept to learn the endpoint's markup.
    assert usage.table_cost_usd == pytest.approx((100 * 3 + 1400 * 3.75 + 10 * 15) / 1e6)
    assert usage.saved_usd == pytest.approx(-1400 * 0.75 / 1e6)  # a write costs more than it saves, once


def test_anthropic_usage_counts_cache_reads_and_writes_into_the_prompt() -> None:
    body = {"model": "claude-3-5-sonnet", "choices": OPENAI_BODY["choices"],
            "usage": {"input_tokens": 50, "output_tokens": 10, "cache_read_input_tokens": 1200,
                      "cache_creation_input_tokens": 0}}
    usage = read_usage(body, cfg("anthropic/claude-3.5-sonnet"))
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (1250, 1200, 10)
    assert usage.cost_usd == pytest.approx((50 * 3 + 1200 * 0.3 + 10 * 15) / 1e6)


@pytest.mark.parametrize("details", [{"cached_tokens": 10**9}, {"cached_tokens": -5}, {"cached_tokens": "1920"},
                                     {"cached_tokens": 1900, "cache_write_tokens": 500}, None, "x"])
def test_hostile_counts_never_exceed_the_prompt(details: Any) -> None:
    cache = prompt_cache({"prompt_tokens": 2000, "prompt_tokens_details": details})
    assert 0 <= cache.cached and 0 <= cache.written and cache.cached + cache.written <= 2000


def test_a_saving_is_what_the_cached_rate_saves() -> None:
    price = find_price(cfg(), "openai/gpt-4o-mini")
    assert price is not None
    assert cache_saving(price, prompt_cache(OPENAI_BODY["usage"])) == pytest.approx(1920 * 0.075 / 1e6)
