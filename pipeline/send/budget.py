"""What a request costs, and the budget that caps the job's cost.

Cost of an answer (`read_usage`): `usage.cost` when the endpoint reports it (OpenRouter; plus the
upstream cost a BYOK key is billed separately), else the price of the model served (models/prices.py: the
config's `prices:` override, else the genai-prices library; per million input / cached input / output
tokens, per image where priced). A body without any usage (a stream cut off after its last
token) is costed from the prompt estimate and the answer's length rather than as free, so the budget
still sees it. Prices are looked up through `find_price` only.

The budget (`Budget`, when `budget.max_cost_usd` is set). A request reserves its worst case
(`max_cost`) only once it holds a concurrency slot and is about to be sent, and gives the reservation
back when its answer is charged. So spent + reserved never exceeds the cap: the overshoot is bounded by
the worst cases in flight, and only when an answer costs more than its worst case. When the next worst
case does not fit, the request waits for the reservations in flight to settle; when nothing is in
flight and it still does not fit, the job truly exceeds the budget and dispatch stops there, within one
request's worst case of the cap.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import Config
from ..errors import BudgetExceeded, Stopped
from ..models.catalog import context_window, max_output_tokens
from ..models.prices import cache_saving, cost_of, find_price, prompt_cache, warn_unpriced
from .usage import checked_usage

# Prompt counts are exact for OpenAI models (prepare/tokens.py) but only calibrated for the others, and
# uncalibrated before a job's first answers. The worst case must not be an underestimate.
PROMPT_SAFETY = 1.25


@dataclass(slots=True)
class Usage:
    model: str
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached_tokens: int = 0         # prompt tokens read from the provider's cache (part of prompt_tokens)
    cache_write_tokens: int = 0    # prompt tokens written to it (part of prompt_tokens)
    saved_usd: float = 0.0         # what the cache saved against the full input price (table prices)
    table_cost_usd: float | None = None  # the table's price of a usage the endpoint costed itself (usage.cost)
    note: str | None = None          # what in the server's usage was not trusted, and what was used instead

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def calibrates(self) -> bool:
        """The prompt count is the server's own (not our fallback): it may teach the token counter."""
        return self.note is None or "usage.prompt_tokens " not in self.note


@dataclass(slots=True)
class Paid:
    """What the attempts of one request were billed, together."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    note: str | None = None

    def add(self, usage: Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += usage.cost_usd
        self.cached_tokens += usage.cached_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        if usage.note:
            self.note = usage.note


def read_usage(body: dict[str, Any], cfg: Config, n_images: int = 0, est_prompt: int | None = None, *,
               batch: bool = False) -> Usage:
    """What this answer cost; read even when the content turns out unusable (it was paid for). `batch`:
    an answer from the Batch API, priced at the batch price. The server's usage is untrusted input
    (send/usage.py): what cannot be trusted is replaced by our own figures and said in `Usage.note`."""
    raw = body.get("usage")
    notes: list[str] = []
    if isinstance(raw, dict):
        if "prompt_tokens" not in raw and type(raw.get("input_tokens")) is int:
            raw = _from_anthropic(raw)
        usage, notes = checked_usage(raw, est_prompt, lambda: _estimate_completion(body))
    else:
        usage = {"prompt_tokens": est_prompt or 0, "completion_tokens": _estimate_completion(body)}
    model, provider = body.get("model"), body.get("provider")
    if model is not None and not isinstance(model, str):
        notes.append(f"the answer's model {str(model)[:40]!r} is not a name: the configured model is used")
    if provider is not None and not isinstance(provider, str):
        notes.append(f"the answer's provider {str(provider)[:40]!r} is not a name: not recorded")
    name = model[:200] if isinstance(model, str) and model else cfg.endpoint.model
    price = find_price(cfg, name, batch=batch) or find_price(cfg, cfg.endpoint.model, batch=batch)
    cache = prompt_cache(usage)
    reported = _reported_cost(usage)
    table = None if price is None else cost_of(price, usage, n_images, cache)
    if reported is None and table is None:
        warn_unpriced(name)
    return Usage(
        model=name,
        provider=provider[:200] if isinstance(provider, str) else None,
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cost_usd=reported if reported is not None else table or 0.0,
        cached_tokens=cache.cached,
        cache_write_tokens=cache.written,
        saved_usd=0.0 if price is None else cache_saving(price, cache),
        table_cost_usd=table if reported is not None else None,
        note="; ".join(notes)[:1000] or None,
    )


def _from_anthropic(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's own usage: input_tokens leaves out the cache reads and writes; ours includes them."""
    cached, written = usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens")
    prompt = usage["input_tokens"] + sum(v for v in (cached, written) if type(v) is int and v > 0)
    return {**usage, "prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens")}


def _estimate_completion(body: dict[str, Any]) -> int:
    """Completion tokens from the answer's length (~4 characters a token), when no usage came back."""
    choices = body.get("choices")
    first: dict[str, Any] = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    raw_message = first.get("message")
    message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    extra = message.get("tool_calls")
    chars = len(text) + (len(orjson.dumps(extra)) if extra else 0)
    return (chars + 3) // 4


def usage_cost(usage: dict[str, Any], model: str, cfg: Config, n_images: int = 0, *, batch: bool = False) -> float:
    reported = _reported_cost(usage)
    if reported is not None:
        return reported
    price = find_price(cfg, model, batch=batch) or find_price(cfg, cfg.endpoint.model, batch=batch)
    if price is None:
        warn_unpriced(model)
        return 0.0
    return cost_of(price, usage, n_images)


def _reported_cost(usage: dict[str, Any]) -> float | None:
    """What the endpoint says it charged (OpenRouter's usage.cost), None when it does not say."""
    reported = usage.get("cost")
    if not isinstance(reported, (int, float)) or isinstance(reported, bool) or reported < 0:
        return None
    cost = float(reported)
    details = usage.get("cost_details")
    upstream = details.get("upstream_inference_cost") if isinstance(details, dict) else None
    if usage.get("is_byok") and isinstance(upstream, (int, float)):
        cost += float(upstream)  # with your own provider key, OpenRouter's fee is only part of the bill
    return cost


def worst_output_tokens(cfg: Config, est_prompt: int, max_tokens: int | None) -> int:
    """Most completion tokens one request can produce: max_tokens, else the model's cap, else the context left."""
    if max_tokens is not None:
        return max_tokens
    model = cfg.endpoint.model
    return max_output_tokens(model) or max(0, context_window(model) - est_prompt)


def max_cost(est_prompt_tokens: int, max_tokens: int | None, cfg: Config, n_images: int = 0, *,
             batch: bool = False) -> float:
    """The most one request can cost, for the budget check before sending.

    Priced at the dearest model it may be served by (the `params.models` fallbacks included), with a
    margin on the prompt estimate. 0.0 when no price is known (config refuses a budget in that case).
    """
    prices = [p for m in [cfg.endpoint.model, *(cfg.params.models or [])] if (p := find_price(cfg, m, batch=batch))]
    if not prices:
        return 0.0
    out = worst_output_tokens(cfg, est_prompt_tokens, max_tokens)
    prompt = est_prompt_tokens * PROMPT_SAFETY
    return max(prompt * p.input_per_m / 1e6 + out * p.output_per_m / 1e6 + n_images * p.per_image for p in prices)


MARKUP_META = "endpoint_markup"  # store meta: "<reported USD> <table USD>" of the answers costed by the endpoint


class Budget:
    """The job's spend against `budget.max_cost_usd` (None: no cap, and nothing is reserved).

    Reservations are the table's worst case times the endpoint's markup: what the endpoint has charged
    (usage.cost) over what the table prices the same usage at, in this job (never below 1). An endpoint
    that bills more than the table (a dearer OpenRouter route, a simulator) is then reserved for at its
    own rate once its first answers are in, so only requests sent before those can overshoot the cap.
    The sums are kept in the store (MARKUP_META) for the next run to start from."""

    def __init__(self, cap: float | None, spent_before: float = 0.0) -> None:
        self.cap = cap
        self.spent = spent_before
        self.billed_reported = 0.0
        self.billed_table = 0.0
        self.reserved = 0.0
        self._in_flight = 0  # reservations held (a count: float sums do not return to exactly 0)
        self._settled: asyncio.Event | None = None
        self._closed = False

    @property
    def markup(self) -> float:
        """How much more than the table the endpoint has been charging in this job (>= 1)."""
        if self.billed_table <= 0:
            return 1.0
        return max(1.0, self.billed_reported / self.billed_table)

    def learn(self, reported: float, table: float) -> bool:
        """An answer the endpoint costed itself and what the table says; True when the markup moved by
        more than 1% (worth keeping in the store)."""
        if table <= 0 or reported < 0:
            return False
        before = self.markup
        self.billed_reported += reported
        self.billed_table += table
        return abs(self.markup - before) > 0.01 * before

    def seed(self, stored: str | None) -> None:
        """Start from an earlier run's sums (MARKUP_META), if any."""
        try:
            reported, table = (float(x) for x in (stored or "").split())
        except ValueError:
            return
        if reported >= 0 and table > 0:
            self.billed_reported, self.billed_table = reported, table

    def learned(self) -> str:
        return f"{self.billed_reported!r} {self.billed_table!r}"

    async def reserve(self, amount: float) -> float:
        """Hold `amount` (the table's worst case) times the markup for a request about to be sent; returns
        what to `release` after its answer.

        Waits while reservations in flight may still make room; raises BudgetExceeded when nothing is
        in flight and `amount` still does not fit, and Stopped when dispatch stops meanwhile."""
        if self.cap is None:
            return 0.0
        amount *= self.markup
        while self.spent + self.reserved + amount > self.cap:
            if self._closed:
                raise Stopped()
            if not self._in_flight:
                raise BudgetExceeded(
                    f"budget reached: spent ${self.spent:.4f} and the next request may cost up to ${amount:.4f}, "
                    f"over budget.max_cost_usd=${self.cap:g}")
            if self._settled is None:
                self._settled = asyncio.Event()
            await self._settled.wait()
        if self._closed:
            raise Stopped()
        self.reserved += amount
        self._in_flight += 1
        return amount

    def release(self, amount: float) -> None:
        if self.cap is None:
            return
        self._in_flight -= 1
        self.reserved = self.reserved - amount if self._in_flight else 0.0
        self._wake()

    def charge(self, cost: float) -> None:
        # Costs are checked where they are read (send/usage.py); a negative one must still never lower the spend.
        self.spent += max(0.0, cost)

    def close(self) -> None:
        """Dispatch stopped: whoever waits for room leaves (as Stopped)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._settled is not None:
            self._settled.set()
            self._settled = None
