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
    cache_write_per_m: float | None = None

    @property
    def cached_rate(self) -> float:
        return self.input_per_m if self.cached_input_per_m is None else self.cached_input_per_m

    @property
    def write_rate(self) -> float:
        return self.input_per_m if self.cache_write_per_m is None else self.cache_write_per_m


@dataclass(frozen=True, slots=True)
class PromptCache:
    """What an answer's usage says about the provider's prompt cache: tokens read from it and written to it
    (both included in prompt_tokens)."""

    cached: int = 0
    written: int = 0


def find_price(cfg: Config, model: str, *, batch: bool = False) -> ModelPrice | None:
    """The price of a model name as configured or served; None when neither the config nor the library knows it.

    With `params.service_tier: flex` a synchronous request costs the Flex price: the library's flex
    variant, else the batch price (OpenAI prices Flex at the Batch API's rates)."""
    flex = not batch and cfg.params.service_tier == "flex"
    override = _override(cfg, model)
    if override is not None:
        price = ModelPrice(override.input_per_m, override.output_per_m, override.per_image,
                           override.cached_input_per_m, "override (prices: in the config)", override.cache_write_per_m)
        if flex:
            return replace(_batch_override(price, override), source=f"{price.source}, flex = batch price")
        if not batch:
            return price
        return _batch_override(price, override)
    if flex:
        return library_price(model, tier="flex")
    return library_price(model, batch=batch)


def _batch_override(price: ModelPrice, override: Any) -> ModelPrice:
    if override.batch_input_per_m is not None and override.batch_output_per_m is not None:
        factor = override.batch_input_per_m / price.input_per_m if price.input_per_m else OPENAI_BATCH_FACTOR
        return replace(price, input_per_m=override.batch_input_per_m, output_per_m=override.batch_output_per_m,
                       cached_input_per_m=_scaled(price.cached_input_per_m, factor),
                       source="override (prices: batch_input_per_m / batch_output_per_m)")
    return _halved(price, "override")


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


def prompt_cache(usage: dict[str, Any]) -> PromptCache:
    """Cached and cache-write prompt tokens, as OpenAI / OpenRouter (`prompt_tokens_details.cached_tokens`,
    `.cache_write_tokens`) or Anthropic (`cache_read_input_tokens`, `cache_creation_input_tokens`) report them;
    never more than the prompt tokens they are part of."""
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = _int(details.get("cached_tokens")) or _int(usage.get("cache_read_input_tokens"))
    written = _int(details.get("cache_write_tokens")) or _int(usage.get("cache_creation_input_tokens"))
    prompt = _int(usage.get("prompt_tokens"))
    cached = min(cached, prompt)
    return PromptCache(cached, min(written, prompt - cached))


def cost_of(price: ModelPrice, usage: dict[str, Any], n_images: int = 0, cache: PromptCache | None = None) -> float:
    """USD for one answer's usage: cached prompt tokens at the cached price, cache writes at the write price.
    `cache`: the usage's prompt_cache() when the caller has read it already (once per answer on the hot path)."""
    prompt = _int(usage.get("prompt_tokens"))
    cache = cache if cache is not None else prompt_cache(usage)
    fresh = prompt - cache.cached - cache.written
    return ((fresh * price.input_per_m + cache.cached * price.cached_rate + cache.written * price.write_rate
             + _int(usage.get("completion_tokens")) * price.output_per_m) / 1e6 + n_images * price.per_image)


def cache_saving(price: ModelPrice, cache: PromptCache) -> float:
    """USD the prompt cache saved on one answer against the full input price (writes may cost extra)."""
    return (cache.cached * (price.input_per_m - price.cached_rate)
            - cache.written * (price.write_rate - price.input_per_m)) / 1e6


def missing_price_hint(model: str) -> str:
    return (f"add prices: {{{model!r}: {{input_per_m: ..., output_per_m: ...}}}} (USD per million tokens) to "
            f"the config; {library_version()} does not know {model!r}")


@functools.lru_cache(maxsize=256)
def library_price(model: str, *, batch: bool = False, tier: str | None = None) -> ModelPrice | None:
    """The bundled library's current price for a model name; cached (the table does not change in a run).
    `tier="flex"`: the flex variant where the library has one, else the batch price."""
    if tier == "flex":
        flex = _variant(model, {"service_tier": "flex"})
        if flex is not None:
            sync = library_price(model)
            return _batch_cached(flex, sync) if sync is not None and flex.input_per_m != sync.input_per_m else flex
        price = library_price(model, batch=True)
        return None if price is None else replace(price, source=price.source + " (flex = the batch price)")
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
        if batch:
            price = _batch_cached(price, _from_library(info.get_prices(now), ""))
        elif price.cached_input_per_m is None and provider == "openrouter":
            price = _vendor_cache_rates(price, bare, vendor_id)
        return replace(price, source=price.source + (" batch price" if batch else ""))
    return None


def _batch_cached(price: ModelPrice, sync: ModelPrice | None) -> ModelPrice:
    """Cached reads keep the batch discount: a batch variant that only inherits the synchronous cached rate
    (or has none) gets that rate times the batch factor (OpenAI: batch and flex stack with caching)."""
    if sync is None or sync.cached_input_per_m is None or not sync.input_per_m:
        return price
    if price.cached_input_per_m is not None and price.cached_input_per_m != sync.cached_input_per_m:
        return price  # the library has a batch cached rate of its own
    return replace(price, cached_input_per_m=sync.cached_input_per_m * price.input_per_m / sync.input_per_m)


def _vendor_cache_rates(price: ModelPrice, bare: str, vendor: str | None) -> ModelPrice:
    """OpenRouter's entry may lack the cache rates its vendor's entry has (Anthropic models): take those."""
    own = library_price(bare, batch=False) if vendor is None else _vendor_price(bare, vendor)
    if own is None or own.cached_input_per_m is None or own.input_per_m != price.input_per_m:
        return price
    return replace(price, cached_input_per_m=own.cached_input_per_m, cache_write_per_m=own.cache_write_per_m)


def _vendor_price(bare: str, vendor: str) -> ModelPrice | None:
    from genai_prices import data_snapshot

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(bare, None, vendor, None)
    except LookupError:
        return None
    return _from_library(info.get_prices(datetime.now(UTC)), "")


def _variant(model: str, when: dict[str, str]) -> ModelPrice | None:
    """A price variant of the library (a service tier), None when the model has none."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    vendor, _, bare = model.rpartition("/")
    for ref, provider in ((bare, _VENDORS.get(vendor, vendor) or None), (bare, None)):
        try:
            found, info = snapshot.find_provider_model(ref, None, provider, None)
        except LookupError:
            continue
        if any(v.when == when for v in info.price_variants or ()):
            label = ", ".join(f"{k} {v}" for k, v in when.items())
            return _from_library(info.get_prices(datetime.now(UTC), when),
                                 f"{library_version()}: {found.id} {info.id} {label} price")
    return None


def _from_library(prices: Any, source: str) -> ModelPrice | None:
    def rate(name: str) -> float | None:
        value = getattr(prices, name, None)
        value = getattr(value, "base", value)  # TieredPrices: the base tier
        return None if value is None else float(value)

    inp, out = rate("input_mtok"), rate("output_mtok")
    if inp is None or out is None:
        return None  # an embedding or image model: not priced per chat token
    return ModelPrice(inp, out, 0.0, rate("cache_read_mtok"), source, rate("cache_write_mtok"))


def _halved(price: ModelPrice, what: str) -> ModelPrice:
    f = OPENAI_BATCH_FACTOR
    return ModelPrice(price.input_per_m * f, price.output_per_m * f, price.per_image * f,
                      _scaled(price.cached_input_per_m, f),
                      f"{price.source}; batch = 50% of {what} (OpenAI Batch API pricing)",
                      _scaled(price.cache_write_per_m, f))


def _scaled(rate: float | None, factor: float) -> float | None:
    return None if rate is None else rate * factor


def _override(cfg: Config, model: str) -> Any:
    """The config's price: exact name, then without the 'vendor/' prefix, then with 'openai/'."""
    bare = model.rsplit("/", 1)[-1]
    prices = cfg.prices
    return prices.get(model) or prices.get(bare) or prices.get(f"openai/{bare}")


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0
