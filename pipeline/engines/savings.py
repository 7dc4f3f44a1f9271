"""What the dry run predicts about the price levers: the provider's prompt cache, the run mode's prices and
time, and (`--dry-run --compare`) the modes side by side.

The prompt cache. Every request starts with the same shared prefix (the builder counts it on the first
request: tools or schema shaping, a fixed system prompt, the fixed start of the user template). The
provider caches it when it reaches its minimum (models/catalog.py: 1,024 tokens for OpenAI, in steps of
128; model-dependent for Anthropic and Gemini, which cache only when the prefix is marked, i.e. with
`prompt.cache: auto`). The first wave of requests finds the cache cold: one request for a breakpoint
provider (it writes the cache, at the write price), up to `limits.max_concurrency` for OpenAI's automatic
cache (requests that arrive together all miss); every later request reads the cacheable part at the
cached rate. That is the "predicted" figure; the range itself stays the no-cache worst case.

Modes. `run.mode: batch` is priced at the batch price and takes up to the 24 h completion window (its
rate limits do not apply); `params.service_tier: flex` at the Flex price, at the sync limits' pace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..models.catalog import cache_min_tokens, cacheable_tokens, prompt_cache_style
from ..models.prices import ModelPrice, find_price
from .estimate import Estimate, cost_range, time_bounds

BATCH_WINDOW_S = 24 * 3600.0  # completion_window: 24h, the only window OpenAI's Batch API offers


@dataclass(frozen=True, slots=True)
class CachePrediction:
    style: str               # "automatic" (OpenAI and compatible) or "breakpoint" (Anthropic, Gemini)
    shared_tokens: int       # prompt tokens every request shares
    minimum: int             # the provider's minimum cacheable prefix for this model
    cacheable: int           # of the shared tokens, what the provider would cache per request
    cached_tokens: int       # predicted reads, over the requests to send
    written_tokens: int      # predicted writes (breakpoint providers: once, by the first request)
    share: float             # cached / prompt tokens
    marked: bool             # breakpoint providers: whether requests carry the mark (prompt.cache: auto)


def predict_cache(est: Estimate, cfg: Config) -> CachePrediction | None:
    """The prompt cache's likely share of this job's prompt tokens; None when nothing is to be sent."""
    if not est.requests or est.shared_prefix is None:
        return None
    model = cfg.endpoint.model
    style = prompt_cache_style(model)
    marked = style == "automatic" or cfg.prompt.cache == "auto"
    cacheable = cacheable_tokens(model, est.shared_prefix) if marked else 0
    cold = 1 if style == "breakpoint" else min(est.requests, cfg.limits.max_concurrency)
    cached = cacheable * max(0, est.requests - cold)
    written = cacheable * min(cold, est.requests) if style == "breakpoint" else 0
    share = cached / est.prompt_tokens if est.prompt_tokens else 0.0
    return CachePrediction(style, est.shared_prefix, cache_min_tokens(model), cacheable, cached, written, share,
                           marked)


def cached_cost(cost: float, cache: CachePrediction | None, price: ModelPrice) -> float:
    """A cost computed at the full input price, with the predicted cache reads and writes at their rates."""
    if cache is None:
        return cost
    return (cost - cache.cached_tokens * (price.input_per_m - price.cached_rate) / 1e6
            + cache.written_tokens * (price.write_rate - price.input_per_m) / 1e6)


def mode_price(cfg: Config) -> ModelPrice | None:
    return find_price(cfg, cfg.endpoint.model, batch=cfg.run.mode == "batch")


def time_range(est: Estimate, cfg: Config) -> tuple[float, float, str]:
    """(seconds at least, at most, what decides it) for the run mode."""
    if cfg.run.mode == "batch":
        # A cascade's stage waits for the one before: one window per stage (the audit goes with the first).
        windows = len(cfg.cascade or [None])
        return (cfg.batch.poll_interval_s, windows * BATCH_WINDOW_S,
                "the Batch API's 24 h window (often minutes to hours)" + (
                    f", one per cascade stage ({windows})" if windows > 1 else ""))
    bounds = time_bounds(est, cfg)
    slowest = max(bounds, key=lambda k: bounds[k][1])
    return max(lo for lo, _ in bounds.values()), max(hi for _, hi in bounds.values()), slowest


def cache_lines(est: Estimate, cfg: Config, add: Any) -> None:
    """The dry run's prompt-cache lines: shared prefix, the minimum, predicted share and cost, warnings."""
    for note in est.cache_notes:
        add("", f"warning: {note}")
    cache = predict_cache(est, cfg)
    if cache is None:
        return
    who = "OpenAI caches" if cache.style == "automatic" else f"{cfg.endpoint.model} caches marked prefixes of"
    reach = "reaches it" if cache.shared_tokens >= cache.minimum else "below it: nothing will be cached"
    add("prompt cache", f"shared prefix {cache.shared_tokens:,} tokens a request ({who} {cache.minimum:,}+ "
        f"tokens: {reach})")
    if cache.style == "breakpoint" and not cache.marked:
        add("", "prompt.cache is off: no cache_control mark is sent, so nothing is cached")
        return
    price = mode_price(cfg)
    costs = cost_range(est, cfg)
    if not cache.cached_tokens or price is None or costs is None:
        return
    low, likely, _ = costs
    base = likely if likely is not None else low
    add("", f"predicted {cache.share:.0%} of input tokens read from the cache ({cache.cached_tokens:,}"
        + (f", {cache.written_tokens:,} written once" if cache.written_tokens else "")
        + f"): ${cached_cost(base, cache, price):.4f} instead of ${base:.4f}"
        + (" (no output counted: output unknown yet)" if likely is None else ""))


def compare(est: Estimate, cfg: Config) -> list[dict[str, Any]]:
    """The same requests under each run mode this endpoint and model allow: price, predicted cost, time."""
    modes: list[tuple[str, dict[str, Any]]] = [("sync", {"run": {"mode": "sync"}})]
    if find_price(cfg.model_copy(update={"params": cfg.params.model_copy(update={"service_tier": "flex"})}),
                  cfg.endpoint.model) is not None and prompt_cache_style(cfg.endpoint.model) == "automatic":
        modes.append(("sync, service_tier flex", {"run": {"mode": "sync"}, "service_tier": "flex"}))
    modes.append(("batch", {"run": {"mode": "batch"}}))
    rows = []
    for name, change in modes:
        params = cfg.params.model_copy(update={"service_tier": change.get("service_tier", cfg.params.service_tier)})
        other = cfg.model_copy(update={"run": cfg.run.model_copy(update=change["run"]), "params": params})
        price, costs = mode_price(other), cost_range(est, other)
        cache = predict_cache(est, other)
        low, high, slowest = time_range(est, other)
        row: dict[str, Any] = {"mode": name, "time_s": [round(low, 1), round(high, 1)], "time_decided_by": slowest,
                               "cost_usd": None, "price": None if price is None else price.source}
        if costs is not None and price is not None:
            base = costs[1] if costs[1] is not None else costs[0]
            row["cost_usd"] = {"min": round(costs[0], 6), "likely": None if costs[1] is None else round(costs[1], 6),
                               "max": round(costs[2], 6),
                               "with_prompt_cache": round(cached_cost(base, cache, price), 6)}
        rows.append(row)
    return rows


def compare_lines(est: Estimate, cfg: Config) -> str:
    from .estimate import duration

    lines = ["", "Modes side by side (the same requests; predicted = likely output, prompt cache as predicted):"]
    for row in compare(est, cfg):
        cost = row["cost_usd"]
        money = "no price" if cost is None else (f"${cost['min']:.4f} .. ${cost['max']:.4f}, predicted "
                                                 f"${cost['with_prompt_cache']:.4f}")
        low, high = row["time_s"]
        lines.append(f"  {row['mode']:<24} {money:<44} {duration(low)} .. {duration(high)} ({row['time_decided_by']})")
    return "\n".join(lines) + "\n"
