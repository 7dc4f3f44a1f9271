"""The dry run for scripts and for eyes: the estimate as one JSON object, and one request as it would be sent.

`pipeline run CONFIG --dry-run --json` prints `to_json()` alone on stdout (nothing else), so CI can
read it with `json.loads`. Its fields:

    rows            total, done_ok, done_failed, cached, to_send, failing
    requests        distinct requests to send
    prompt_tokens   total (images included), images, image_tokens, method (exact / calibrated)
    output_tokens   min (0), max, likely (null until answers exist), likely_basis
    cost_usd        min (no output), likely (null when unknown), max (max output at the dearest model);
                    null when the model has no price
    prices          model -> {input_per_m, output_per_m, cached_input_per_m, cache_write_per_m, per_image,
                    source} or null, at the run mode's prices (batch, flex)
    budget          null, or {max_cost_usd, spent_before, left}
    time_s          min, max, slowest (the limit that decides), bounds {limit: [min, max]}; in batch mode
                    the batch window (first poll .. 24 h)
    prompt_cache    null, or shared_prefix_tokens, provider_minimum, style, cacheable_per_request,
                    predicted_cached_tokens / _written_tokens / _share / _cost_usd (engines/savings.py)
    cache_warnings  templates that put row values before fixed text
    modes           with --compare: per run mode {mode, cost_usd {min, likely, max, with_prompt_cache},
                    price, time_s, time_decided_by}
    failing         reason -> rows that cannot become a request, and examples
    notes           what the dry run noticed about output.dir

The text report ends with `example_request()`: the first request to send, with its schema shaping,
its headers named but never their values (the API key is never shown), and image data cut short.
"""
from __future__ import annotations

import json
from typing import Any

import orjson

from ..config import Config
from ..models.prices import find_price
from .estimate import Estimate, cost_range, time_bounds
from .estimate_store import spent_before

_DATA_URL_SHOWN = 48  # characters of an image data URL kept in the printed example
_TEXT_SHOWN = 4000    # a longer string value is cut, its length said


def to_json(est: Estimate, cfg: Config, *, compare: bool = False) -> str:
    from .savings import compare as modes
    from .savings import predict_cache, time_range

    costs = cost_range(est, cfg)
    bounds = time_bounds(est, cfg) if cfg.run.mode != "batch" else {"batch window": time_range(est, cfg)[:2]}
    cache = predict_cache(est, cfg)
    cap = cfg.budget.max_cost_usd
    spent = spent_before(est, cfg) if cap is not None else 0.0
    likely = est.output_likely_per_request
    doc: dict[str, Any] = {
        "model": cfg.endpoint.model,
        "rows": {"total": est.rows_total, "done_ok": est.rows_done_ok, "done_failed": est.rows_done_failed,
                 "cached": est.rows_cached, "to_send": est.rows_to_send, "failing": est.rows_failing},
        "requests": est.requests,
        "prompt_tokens": {"total": est.prompt_tokens, "images": est.images, "image_tokens": est.image_tokens,
                          "method": est.token_method},
        "output_tokens": {"min": 0, "max": est.output_max,
                          "likely": None if likely is None else round(likely * est.requests),
                          "likely_basis": est.likely_basis},
        "cost_usd": None if costs is None else {"min": _r(costs[0]), "likely": _r(costs[1]), "max": _r(costs[2])},
        "prices": {m: _price(cfg, m) for m in [cfg.endpoint.model, *(cfg.params.models or [])]},
        "budget": None if cap is None else {"max_cost_usd": cap, "spent_before": _r(spent), "left": _r(cap - spent)},
        "time_s": {"min": _r(max(lo for lo, _ in bounds.values()), 3),
                   "max": _r(max(hi for _, hi in bounds.values()), 3),
                   "slowest": max(bounds, key=lambda k: bounds[k][1]),
                   "bounds": {k: [_r(lo, 3), _r(hi, 3)] for k, (lo, hi) in bounds.items()}},
        "failing": {"by_reason": dict(est.failing_by_reason), "examples": est.examples},
        "notes": est.notes,
        "prompt_cache": None if cache is None else {
            "shared_prefix_tokens": cache.shared_tokens, "provider_minimum": cache.minimum, "style": cache.style,
            "cacheable_per_request": cache.cacheable, "predicted_cached_tokens": cache.cached_tokens,
            "predicted_written_tokens": cache.written_tokens, "predicted_share": round(cache.share, 4),
            "predicted_cost_usd": _predicted(est, cfg, cache, costs)},
        "cache_warnings": est.cache_notes,
    }
    if compare:
        doc["modes"] = modes(est, cfg)
    return json.dumps(doc, ensure_ascii=False)


def _predicted(est: Estimate, cfg: Config, cache: Any, costs: tuple[float, float | None, float] | None) -> float | None:
    from .savings import cached_cost, mode_price

    price = mode_price(cfg)
    if costs is None or price is None:
        return None
    return _r(cached_cost(costs[1] if costs[1] is not None else costs[0], cache, price))


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _price(cfg: Config, model: str) -> dict[str, Any] | None:
    price = find_price(cfg, model, batch=cfg.run.mode == "batch")
    if price is None:
        return None
    return {"input_per_m": price.input_per_m, "output_per_m": price.output_per_m,
            "cached_input_per_m": price.cached_input_per_m, "cache_write_per_m": price.cache_write_per_m,
            "per_image": price.per_image, "source": price.source}


def example_request(est: Estimate, cfg: Config) -> str:
    """The first request to send, as the endpoint would receive it (header values and image data left out)."""
    if est.example is None:
        return "\nNo request to send.\n"
    url = ("the built-in simulator" if cfg.endpoint.base_url == "simulator"
           else cfg.endpoint.base_url.rstrip("/") + "/chat/completions")
    lines = ["", "The first request to send, as it would be sent:", f"  POST {url}",
             f"  Authorization: Bearer <the key from ${cfg.endpoint.api_key_env}, not shown>",
             "  Content-Type: application/json"]
    lines += [f"  {name}: <set, not shown>" for name in cfg.endpoint.request_headers()]
    body = _shorten(orjson.loads(est.example))
    lines += ["  " + line for line in json.dumps(body, indent=2, ensure_ascii=False).splitlines()]
    return "\n".join(lines) + "\n"


def _shorten(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > _DATA_URL_SHOWN:
        return f"{value[:_DATA_URL_SHOWN]}... ({len(value):,} characters)"
    if isinstance(value, str) and len(value) > _TEXT_SHOWN:
        return f"{value[:_TEXT_SHOWN]}... ({len(value):,} characters)"
    return value
