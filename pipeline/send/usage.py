"""A server's `usage` is untrusted input: check what we count before anything counts it.

A hostile or broken server can report `prompt_tokens: "lots"`, a count past 64 bits, negative tokens
(which would refill the tokens/minute bucket) or a negative `cost` (which would lower the budget's
spend). `checked_usage` returns a copy in which every count and cost is a plain, finite, non-negative
number of a plausible size; a field that is not is replaced by our own figure (the prompt as we
counted it, the answer's length, the table price) and named in `notes`, which the record keeps
(`usage_note`) and the log states. Fields we do not count pass through untouched.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# Far past any context window: a larger count is a broken or hostile server, not an answer.
MAX_TOKENS = 100_000_000
# Far past any one chat completion's price (a million output tokens of the dearest model is ~$600).
MAX_COST_USD = 10_000.0
_COSTS = ("cost", "upstream_inference_cost")
_OURS = ("usage.prompt_tokens", "usage.completion_tokens")


def _count(value: Any) -> int | None:
    """A token count as we accept it: an integer (or an integral float) in [0, MAX_TOKENS]."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_TOKENS else None


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= MAX_COST_USD else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_usage(usage: dict[str, Any], est_prompt: int | None,
                  est_completion: Callable[[], int]) -> tuple[dict[str, Any], list[str]]:
    """(a usage dict whose counts and costs can be trusted, what was replaced and by what)."""
    notes: list[str] = []
    clean = _checked(usage, "usage", notes)
    for name, ours, what in (("prompt_tokens", lambda: est_prompt or 0, "our own count"),
                             ("completion_tokens", est_completion, "the answer's length")):
        value = usage.get(name)
        if value is not None and name not in clean:
            clean[name] = ours()
            notes.append(f"usage.{name} {_shown(value)} is not a token count: used {what} ({clean[name]})")
    prompt = clean.get("prompt_tokens") or 0
    details = clean.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return clean, notes
    cached = details.get("cached_tokens")
    if isinstance(cached, int) and cached > prompt:
        notes.append(f"usage.prompt_tokens_details.cached_tokens {cached} is more than the prompt's {prompt}: "
                     f"counted as {prompt}")
        clean["prompt_tokens_details"] = {**details, "cached_tokens": prompt}
    return clean, notes


def _checked(node: dict[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """Counts (`*_tokens`) and costs checked at this level and one level down (`*_details`)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{where}.{key}"
        if isinstance(key, str) and key.endswith("_tokens"):
            if (n := _count(value)) is not None:
                out[key] = n
            elif value is not None and name not in _OURS:  # the two we count ourselves: noted by the caller
                notes.append(f"{name} {_shown(value)} is not a token count: not counted")
        elif key in _COSTS:
            if (c := _cost(value)) is not None:
                out[key] = c
            elif value is not None:
                instead = "the table price is used" if key == "cost" else "not counted"
                notes.append(f"{name} {_shown(value)} is not a cost in USD: {instead}")
        elif isinstance(value, dict) and where == "usage":
            out[key] = _checked(value, name, notes)
        else:
            out[key] = value
    return out
