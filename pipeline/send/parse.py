"""A classified completion body -> the fields of one result row.

Runs after the raw body is in hand and before it counts as done; the structured plan (if any) extracts
and validates the output, raising `BadContentError` for the bad-content class. What the answer cost is
read before this (send/budget.py), because an unusable answer is paid for too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadContentError
from ..prepare.structured import StructuredPlan
from .budget import Usage
from .confidence import choice_fields, logprob_confidence, row_confidence, vote_confidence


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
    confidence: float | None = None       # the row's least sure field (quality.confidence)
    confidence_json: str | None = None    # {field: confidence} for the enum and boolean fields


def parse_completion(body: dict[str, Any], usage: Usage, plan: StructuredPlan | None,
                     confidence: str = "off") -> Parsed:
    """Raises BadContentError when the answer cannot be used. `confidence` is quality.confidence: with
    votes, the sample kept is the one agreeing with the most per-field majorities (send/confidence.py)."""
    choices = body["choices"]
    by_field: dict[str, float | None] | None = None
    index = 0
    if confidence == "votes" and plan is not None and len(choices) > 1:
        index, by_field = vote_confidence([_sample(c, plan) for c in choices], choice_fields(plan.schema))
    choice = choices[index]
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
    if confidence == "logprobs" and plan is not None and plan.mode != "tool":
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        by_field = logprob_confidence(tokens if isinstance(tokens, list) else [], output, choice_fields(plan.schema))
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
        confidence=row_confidence(by_field) if by_field else None,
        confidence_json=orjson.dumps(by_field).decode() if by_field else None,
    )


def _sample(choice: Any, plan: StructuredPlan) -> Any:
    """One vote: the sample's validated output, or None when it is unusable (it still counts as a vote)."""
    if not isinstance(choice, dict):
        return None
    try:
        return plan.extract(choice.get("message") or {}, choice.get("finish_reason"))[0]
    except BadContentError:
        return None
