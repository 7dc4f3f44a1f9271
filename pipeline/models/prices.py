"""What a model costs: the config's `prices:` override, else the `genai-prices` library, offline.

`genai-prices` ships its price table inside the package (`genai_prices.data`); we read only that
bundled snapshot and never start its `UpdatePrices` fetcher, so a machine without network prices the
same. A model name is looked up as OpenRouter spells it (`anthropic/claude-3.5-sonnet`), then at its
own vendor without the prefix (`claude-3.5-sonnet` at anthropic), then by the library's own matching.

Batch prices (the OpenAI Batch API): the library's batch variant when it has one, else half the
synchronous price, which is OpenAI's published Batch API rule ("50% discount"). An answer whose
`usage.cost` the endpoint reports (OpenRouter) is charged that instead; see write/parse.py.

Images: OpenAI bills images as input tokens (counted by the tile rule into the prompt), so the
library's per-image price is 0 for them; `per_image` in an override covers providers that charge per
image. Tiered prices (cheaper below N prompt tokens) use the base tier.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config

OPENAI_BATCH_FACTOR = 0.5
_WARNED: set[str] = set()
# OpenRouter vendor prefix -> the library's provider id, where they differ.
_VENDORS = {"mistralai": "mistral", "meta-llama": "meta", "moonshotai": "moonshotai", "x-ai": "x-ai", "z-ai": "zai"}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens (and per image), with where the figures came from."""

    input_per_m: float
    output_per_m: float
    per_image: float = 0.0
    cached_input_per_m: float | None = None
    source: str = ""


def find_price(cfg: Config, model: str, *, batch: bool = False) -> ModelPrice | None:
    """The price of a model name as configured or served; None when neither the config nor the library knows it."""
    override = _override(cfg, model)
    if override is not None:
        price = ModelPrice(override.input_per_m, override.output_per_m, override.per_image,
                           override.cached_input_per_m, "override (prices: in the config)")
        if not batch:
            return price
        if override.batch_input_per_m is not None and override.batch_output_per_m is not None:
            return replace(price, input_per_m=override.batch_input_per_m, output_per_m=override.batch_output_per_m,
                           source="override (prices: batch_input_per_m / batch_output_per_m)")
        return _halved(price, "override")
    return library_price(model, batch=batch)


def warn_unpriced(model: str) -> None:
    """An answer with no usage.cost for a model without a price: say so once per process, not per answer."""
    if model in _WARNED:
        return
    _WARNED.add(model)
    logging.getLogger("pipeline").warning(
        "no price known for %s and the endpoint reports no usage.cost: its cost is unknown (counted as $0); "
        "to count it, %s", model, missing_price_hint(model))


def library_version() -> str:
    from importlib.metadata import version

    return f"genai-prices {version('genai-prices')}"


def cost_of(price: ModelPrice, usage: dict[str, Any], n_images: int = 0) -> float:
    """USD for one answer's usage: cached prompt tokens at the cached price where there is one."""
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = min(prompt, _int(details.get("cached_tokens"))) if isinstance(details, dict) else 0
    cached_rate = price.cached_input_per_m if price.cached_input_per_m is not None else price.input_per_m
    return ((prompt - cached) * price.input_per_m + cached * cached_rate
            + _int(usage.get("completion_tokens")) * price.output_per_m) / 1e6 + n_images * price.per_image


def missing_price_hint(model: str) -> str:
    return (f"add prices: {{{model!r}: {{input_per_m: ..., output_per_m: ...}}}} (USD per million tokens) to "
            f"the config; {library_version()} does not know {model!r}")


@functools.lru_cache(maxsize=256)
def library_price(model: str, *, batch: bool = False) -> ModelPrice | None:
    """The bundled library's current price for a model name; cached (the table does not change in a run)."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()  # the bundled one: UpdatePrices is never started
    vendor, _, bare = model.rpartition("/")
    vendor_id = _VENDORS.get(vendor, vendor) or None
    tries = [(bare, vendor_id), (bare, None), (model, "openrouter")] if batch else \
        [(model, "openrouter"), (bare, vendor_id), (bare, None)]
    now = datetime.now(UTC)
    for ref, provider in tries:
        if not ref or (provider == "openrouter" and "/" not in ref):
            continue
        try:
            found, info = snapshot.find_provider_model(ref, None, provider, None)
        except LookupError:
            continue
        has_batch = batch and any(v.when == {"processing": "batch"} for v in info.price_variants or ())
        prices = info.get_prices(now, {"processing": "batch"} if has_batch else None)
        price = _from_library(prices, f"{library_version()}: {found.id} {info.id}")
        if price is None:
            continue
        if batch and not has_batch:
            return _halved(price, "the library's synchronous price")
        return replace(price, source=price.source + (" batch price" if batch else ""))
    return None


def _from_library(prices: Any, source: str) -> ModelPrice | None:
    def rate(name: str) -> float | None:
        value = getattr(prices, name, None)
        value = getattr(value, "base", value)  # TieredPrices: the base tier
        return None if value is None else float(value)

    inp, out = rate("input_mtok"), rate("output_mtok")
    if inp is None or out is None:
        return None  # an embedding or image model: not priced per chat token
    return ModelPrice(inp, out, 0.0, rate("cache_read_mtok"), source)


def _halved(price: ModelPrice, what: str) -> ModelPrice:
    cached = None if price.cached_input_per_m is None else price.cached_input_per_m * OPENAI_BATCH_FACTOR
    return ModelPrice(price.input_per_m * OPENAI_BATCH_FACTOR, price.output_per_m * OPENAI_BATCH_FACTOR,
                      price.per_image * OPENAI_BATCH_FACTOR, cached,
                      f"{price.source}; batch = 50% of {what} (OpenAI Batch API pricing)")


def _override(cfg: Config, model: str) -> Any:
    """The config's price: exact name, then without the 'vendor/' prefix, then with 'openai/'."""
    bare = model.rsplit("/", 1)[-1]
    prices = cfg.prices
    return prices.get(model) or prices.get(bare) or prices.get(f"openai/{bare}")


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0
