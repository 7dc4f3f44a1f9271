"""What the simulated endpoint charges a model: its own list price, as the real endpoints do.

From the `genai-prices` package's bundled table (never fetched), looked up as OpenRouter spells the
model, then at its vendor; a model the table does not know costs $10 / $30 per million (gpt-4-turbo).
Cached prompt tokens cost the model's cache-read price and cache writes its cache-write price (the
input price where the table has none). The Batch API and `service_tier: flex` charge `factor` of it.
"""
from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from .config import Price

_VENDORS = {"mistralai": "mistral", "meta-llama": "meta", "z-ai": "zai"}
FALLBACK = Price()


@functools.lru_cache(maxsize=256)
def list_price(model: str) -> Price:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    vendor, _, bare = model.rpartition("/")
    found: list[Price] = []
    for ref, provider in ((model, "openrouter"), (bare, _VENDORS.get(vendor, vendor) or None), (bare, None)):
        if not ref or (provider == "openrouter" and "/" not in ref):
            continue
        try:
            _, info = snapshot.find_provider_model(ref, None, provider, None)
        except LookupError:
            continue
        prices = info.get_prices(datetime.now(UTC))
        inp, out = _rate(prices, "input_mtok"), _rate(prices, "output_mtok")
        if inp is not None and out is not None:
            found.append(Price(input_per_m=inp, output_per_m=out, cached_input_per_m=_rate(prices, "cache_read_mtok"),
                               cache_write_per_m=_rate(prices, "cache_write_mtok")))
    if not found:
        return FALLBACK
    first = found[0]
    # OpenRouter's entry may lack the cache rates its vendor's entry has (Anthropic models).
    rates = next((p for p in found if p.cached_input_per_m is not None and p.input_per_m == first.input_per_m), first)
    return first.model_copy(update={"cached_input_per_m": rates.cached_input_per_m,
                                    "cache_write_per_m": rates.cache_write_per_m})


def _rate(prices: Any, name: str) -> float | None:
    value = getattr(prices, name, None)
    value = getattr(value, "base", value)  # tiered prices: the base tier
    return None if value is None else float(value)
