"""A classified completion body -> the fields of one result row, and what a request costs.

Runs after the raw body is in hand and before it counts as done; the structured plan (if any) extracts
and validates the output, raising `BadContentError` for the bad-content class.

Cost of an answer: `usage.cost` when the endpoint reports it (OpenRouter; plus the upstream cost a BYOK
key is billed separately), else the model's price (models/prices.py: the config's override, else the
genai-prices library; per model served, per million input / cached input / output tokens, per image
where priced). A body without any usage (a stream cut off after its last token) is
costed from the prompt estimate and the answer's length rather than as free, so the budget still sees
it. `max_cost` is the most one request can cost, which the budget check reserves while it is in flight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..config import Config
from ..errors import BadContentError
from ..build.prompts import context_window, max_output_tokens
from ..build.structured import StructuredPlan
from ..models.prices import cost_of, find_price


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


def read_usage(body: dict[str, Any], cfg: Config, n_images: int = 0, est_prompt: int | None = None) -> Usage:
    """What this answer cost; read even when the content turns out unusable (it was paid for)."""
    usage = body.get("usage")
    model = body.get("model") or cfg.endpoint.model
    if not isinstance(usage, dict):
        usage = {"prompt_tokens": est_prompt or 0, "completion_tokens": _estimate_completion(body)}
    return Usage(
        model=model,
        provider=body.get("provider"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cost_usd=usage_cost(usage, model, cfg, n_images),
    )


def _estimate_completion(body: dict[str, Any]) -> int:
    """Completion tokens from the answer's length (~4 characters a token), when no usage came back."""
    choices = body.get("choices") or [{}]
    first: dict[str, Any] = choices[0] if isinstance(choices[0], dict) else {}
    raw_message = first.get("message")
    message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    extra = message.get("tool_calls")
    chars = len(text) + (len(orjson.dumps(extra)) if extra else 0)
    return (chars + 3) // 4


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
    if isinstance(reported, (int, float)) and not isinstance(reported, bool):
        cost = float(reported)
        details = usage.get("cost_details")
        upstream = details.get("upstream_inference_cost") if isinstance(details, dict) else None
        if usage.get("is_byok") and isinstance(upstream, (int, float)):
            cost += float(upstream)  # with your own provider key, OpenRouter's fee is only part of the bill
        return cost
    price = find_price(cfg, model) or find_price(cfg, cfg.endpoint.model)
    if price is None:
        return 0.0
    return cost_of(price, usage, n_images)


# Prompt counts are exact for OpenAI models (build/tokens.py) but only calibrated for the others, and
# uncalibrated before a job's first answers. The worst case must not be an underestimate.
PROMPT_SAFETY = 1.25


def worst_output_tokens(cfg: Config, est_prompt: int, max_tokens: int | None) -> int:
    """Most completion tokens one request can produce: max_tokens, else the model's cap, else the context left."""
    if max_tokens is not None:
        return max_tokens
    model = cfg.endpoint.model
    return max_output_tokens(model) or max(0, context_window(model) - est_prompt)


def max_cost(est_prompt_tokens: int, max_tokens: int | None, cfg: Config, n_images: int = 0) -> float:
    """The most one request can cost, for the budget check before sending.

    Priced at the dearest model it may be served by (the `params.models` fallbacks included), with a
    margin on the prompt estimate. 0.0 when no price is known (config refuses a budget in that case).
    """
    prices = [p for m in [cfg.endpoint.model, *(cfg.params.models or [])] if (p := find_price(cfg, m))]
    if not prices:
        return 0.0
    out = worst_output_tokens(cfg, est_prompt_tokens, max_tokens)
    prompt = est_prompt_tokens * PROMPT_SAFETY
    return max(prompt * p.input_per_m / 1e6 + out * p.output_per_m / 1e6 + n_images * p.per_image for p in prices)
