"""A classified completion body -> the fields of one result row.

Runs after the raw body is in hand and before it counts as done; the structured plan (if any) extracts
and validates the output, raising `BadContentError` for the bad-content class. Cost comes from
`usage.cost` when the endpoint reports it (OpenRouter), else from the price table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .config import Config
from .errors import BadContentError
from .structured import StructuredPlan


@dataclass(slots=True)
class Parsed:
    content: str | None
    output: Any
    finish_reason: str | None
    model: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    tool_calls_json: str | None
    logprobs_json: str | None


@dataclass(slots=True)
class Usage:
    model: str
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


def read_usage(body: dict[str, Any], cfg: Config, n_images: int = 0) -> Usage:
    """What this answer cost; read even when the content turns out unusable (it was paid for)."""
    usage = body.get("usage") or {}
    model = body.get("model") or cfg.endpoint.model
    return Usage(
        model=model,
        provider=body.get("provider"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cost_usd=usage_cost(usage, model, cfg, n_images),
    )


def parse_completion(body: dict[str, Any], usage: Usage, plan: StructuredPlan | None) -> Parsed:
    """Raises BadContentError when the answer cannot be used."""
    choice = body["choices"][0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    content = message.get("content")
    if isinstance(content, list):  # some servers return content parts even for text
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    tool_calls = message.get("tool_calls")
    logprobs = choice.get("logprobs")
    output: Any = None
    if plan is not None:
        output, raw_text = plan.extract(message, finish)
        if content is None:
            content = raw_text
        if plan.mode == "tool":
            tool_calls = None  # the forced call *is* the output; don't repeat it in a column
    elif message.get("refusal"):
        raise BadContentError(str(message["refusal"])[:300], reason="refusal", content=content)
    elif not content and not tool_calls:
        raise BadContentError("the model returned no content", reason="empty", content=content)
    return Parsed(
        content=content,
        output=output,
        finish_reason=finish,
        model=usage.model,
        provider=usage.provider,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost_usd,
        tool_calls_json=orjson.dumps(tool_calls).decode() if tool_calls else None,
        logprobs_json=(
            orjson.dumps(logprobs["content"]).decode()
            if isinstance(logprobs, dict) and logprobs.get("content") else None
        ),
    )


def usage_cost(usage: dict[str, Any], model: str, cfg: Config, n_images: int = 0) -> float:
    reported = usage.get("cost")
    if isinstance(reported, (int, float)):
        return float(reported)
    price = cfg.price(model) or cfg.price(cfg.endpoint.model)
    if price is None:
        return 0.0
    return (
        int(usage.get("prompt_tokens") or 0) * price.input_per_m / 1e6
        + int(usage.get("completion_tokens") or 0) * price.output_per_m / 1e6
        + n_images * price.per_image
    )


def max_cost(est_prompt_tokens: int, max_tokens: int | None, cfg: Config, n_images: int = 0) -> float:
    """The most one request can cost, for the budget check before sending."""
    price = cfg.price(cfg.endpoint.model)
    if price is None:
        return 0.0
    out = max_tokens if max_tokens is not None else 4096
    return est_prompt_tokens * price.input_per_m / 1e6 + out * price.output_per_m / 1e6 + n_images * price.per_image
