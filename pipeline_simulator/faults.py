"""Which fault an arrival gets, and the error each status fault produces.

One uniform draw per arrival from ``random.Random(seed)`` walks the configured rates in a fixed
order, so the fault sequence depends only on the seed and arrival order: a retry of a failed
request is a new arrival with a fresh draw. Scripted rules (by 1-based arrival number) win.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from .config import RATE_FAULTS, FaultRule, SimConfig
from .envelopes import SimError, flagged_input, generic_error
from .limits import Refusal, go_duration

# Faults that still produce a (possibly broken) 200 completion rather than an error status.
BODY_FAULTS = frozenset({
    "malformed", "schema_invalid", "length", "refusal", "error_200", "error_200_partial", "empty",
    "model_down", "stream_error", "stream_error_legacy", "stream_truncate", "stream_no_usage",
})
TRANSPORT_FAULTS = frozenset({"hang", "reset"})
_ORG = "org-simulator"


@dataclass(slots=True)
class FaultChoice:
    name: str
    rule: FaultRule | None


class FaultPicker:
    def __init__(self, cfg: SimConfig) -> None:
        self.rng = random.Random(cfg.seed)
        self.plan = list(cfg.fault_plan)
        self.thresholds: list[tuple[float, str]] = []
        total = 0.0
        for name in RATE_FAULTS:
            rate = float(getattr(cfg, "rate_" + name))
            if rate > 0:
                total += rate
                self.thresholds.append((total, name))

    def pick(self, arrival: int) -> FaultChoice | None:
        draw = self.rng.random()  # always advance, so scripted rules do not shift the random sequence
        for rule in self.plan:
            if rule.matches(arrival):
                return FaultChoice(rule.fault, rule)
        for threshold, name in self.thresholds:
            if draw < threshold:
                return FaultChoice(name, None)
        return None


@dataclass(slots=True)
class ErrorContext:
    """What an error message may mention about the request that failed."""

    flavor: str
    model: str
    provider: str
    prompt_text: str
    prompt_tokens: int
    max_tokens: int | None
    retry_after: float | None
    tpm: int | None
    rate_headers: dict[str, str]  # OpenRouter X-RateLimit-* for platform 429s


def fault_error(name: str, rule: FaultRule | None, ctx: ErrorContext) -> SimError:
    """The error for a status fault (anything not in BODY_FAULTS / TRANSPORT_FAULTS)."""
    retry = rule.retry_after if rule is not None and rule.retry_after is not None else None
    message = rule.message if rule is not None else None
    if name == "429":
        return rate_limited(ctx, "requests", ctx.retry_after if retry is None else retry, message)
    if name == "429_quota":
        err = SimError(429, message or "You exceeded your current quota, please check your plan and billing details. "
                       "For more information on this error, read the docs: "
                       "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                       "insufficient_quota", "insufficient_quota", provider_wrap=True, error_type="payment_required")
        return err
    if name == "429_too_large":
        limit = ctx.tpm or 30_000
        requested = max(ctx.prompt_tokens + (ctx.max_tokens or 0), limit + 1)
        return too_large(ctx, limit, requested, message)
    if name == "429_capacity":
        capacity_wait = retry if retry is not None else (ctx.retry_after or 1.0)
        return _availability(429, "capacity_exhausted", True, capacity_wait, ctx,
                             message or "Provider capacity exhausted")
    if name == "429_flex":  # OpenAI Flex processing without capacity (not billed; retry later)
        return SimError(429, message or "Resource unavailable: Flex processing has no capacity for this request "
                        "right now. Retry later, or use the default service tier.", "server_error",
                        "resource_unavailable", or_message=message or "Resource unavailable (flex)",
                        error_type="rate_limit_exceeded")
    if name == "503_unavailable":
        wait = retry if retry is not None else ctx.retry_after
        return _availability(503, "temporarily_unavailable", True, wait, ctx,
                             message or "Model temporarily unavailable")
    if name == "503_slow_down":
        return slow_down(retry, message)
    if name == "401":
        return SimError(401, message or _GENERIC_401, "invalid_request_error", "invalid_api_key",
                        or_message=message or "User not found.", lcpp_type="authentication_error")
    if name in ("402", "402_afford"):
        return payment_required(ctx, name == "402_afford", retry, message)
    if name == "403":
        return _moderation(ctx, message)
    if name == "403_key":  # the key itself lacks permission: no moderation metadata
        return generic_error(403, message or "This API key is not allowed to use this model")
    err = generic_error(int(name), message)
    if err.status == 404:
        err.or_message = message or "No endpoints found that can handle the requested parameters."
        err.message = message or f"The model `{ctx.model}` does not exist or you do not have access to it."
    if retry is not None or (err.status in (503, 529) and ctx.retry_after is not None and rule is None):
        err.retry_after = retry if retry is not None else ctx.retry_after
    return err


_GENERIC_401 = "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."


_SLOW_DOWN = ("Slow Down: a sudden increase in your request rate is impacting service reliability. Please reduce "
              "your request rate to its original level, maintain a consistent rate for at least 15 minutes, and "
              "then gradually increase it.")


def slow_down(retry_after: float | None, message: str | None = None) -> SimError:
    """OpenAI's 503 "Slow Down" (relayed by OpenRouter as a provider error): back off as a whole client."""
    return SimError(503, message or _SLOW_DOWN, "server_error", None, provider_wrap=True,
                    error_type="provider_overloaded", retry_after=retry_after)


def auth_error(missing: bool) -> SimError:
    if missing:
        return SimError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                        "invalid_request_error", None, or_message="No auth credentials found",
                        error_type="authentication", lcpp_type="authentication_error")
    return SimError(401, _GENERIC_401, "invalid_request_error", "invalid_api_key", or_message="User not found.",
                    error_type="authentication", lcpp_type="authentication_error")


def rate_limited(ctx: ErrorContext, kind: str, retry_after: float | None, message: str | None = None,
                 limit: int | None = None, used: int | None = None, requested: int = 1) -> SimError:
    """A retryable 429: OpenAI's RPM/TPM wording, OpenRouter's X-RateLimit-* headers and metadata."""
    wait = retry_after if retry_after is not None else 1.0
    scripted = limit is None
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    limit = limit if limit is not None else 60
    used = used if used is not None else limit
    oa_msg = message or (f"Rate limit reached for {ctx.model} in organization {_ORG} on {unit}: Limit {limit}, "
                         f"Used {used}, Requested {requested}. Please try again in {go_duration(wait)}. "
                         "Visit https://platform.openai.com/account/rate-limits to learn more.")
    err = SimError(429, oa_msg, kind, "rate_limit_exceeded",
                   or_message=message or f"Rate limit exceeded: limit_rpm/{ctx.model}",
                   error_type="rate_limit_exceeded", retry_after=retry_after)
    if ctx.flavor == "openrouter" and ctx.rate_headers:
        err.headers.update(ctx.rate_headers)
        err.metadata["headers"] = dict(ctx.rate_headers)
    elif ctx.flavor == "openai" and scripted:  # real bucket refusals already carry bucket headers
        err.headers[f"x-ratelimit-remaining-{kind}"] = "0"
        err.headers[f"x-ratelimit-reset-{kind}"] = go_duration(wait)
    return err


def too_large(ctx: ErrorContext, limit: int, requested: int, message: str | None = None) -> SimError:
    """The permanent TPM 429: same code as a rate limit, but retrying can never succeed."""
    msg = message or (f"Request too large for {ctx.model} in organization {_ORG} on tokens per min (TPM): "
                      f"Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order "
                      "to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.")
    return SimError(429, msg, "tokens", "rate_limit_exceeded", provider_wrap=True, error_type="token_limit_exceeded")


def refusal_error(refusal: Refusal, ctx: ErrorContext) -> SimError:
    if refusal.kind == "too_large":
        return too_large(ctx, refusal.limit, refusal.requested)
    wait = math.ceil(refusal.retry_after * 1000) / 1000
    return rate_limited(ctx, refusal.kind, wait, None, refusal.limit, refusal.used, refusal.requested)


def payment_required(ctx: ErrorContext, afford: bool, retry_after: float | None = None,
                     message: str | None = None, can_afford: int | None = None) -> SimError:
    if afford:
        wanted = ctx.max_tokens or 4096
        affordable = can_afford if can_afford is not None else max(1, wanted // 4)
        msg = message or (f"This request requires more credits, or fewer max_tokens. You requested up to {wanted} "
                          f"tokens, but can only afford {affordable}. To increase, visit "
                          "https://openrouter.ai/settings/credits and add more credits")
        err = SimError(402, msg, "insufficient_quota", "insufficient_quota", error_type="payment_required",
                       metadata={"provider_name": None})
    else:
        source = "openrouter_in_flight_budget" if retry_after is not None else "openrouter_credits"
        msg = message or "Insufficient credits. Add more using https://openrouter.ai/settings/credits"
        err = SimError(402, msg, "insufficient_quota", "insufficient_quota", error_type="payment_required",
                       metadata={"limit_source": source})
    err.retry_after = retry_after
    return err


def _moderation(ctx: ErrorContext, message: str | None) -> SimError:
    reasons = ["harassment"]
    or_msg = message or (f"{ctx.model} requires moderation on {ctx.provider}. Your input was flagged for "
                         f"\"{reasons[0]}\". No credits were charged.")
    meta: dict[str, Any] = {"reasons": reasons, "flagged_input": flagged_input(ctx.prompt_text),
                            "provider_name": ctx.provider, "model_slug": ctx.model}
    return SimError(403, message or "Country, region, or territory not supported", "request_forbidden",
                    "unsupported_country_region_territory", or_message=or_msg, error_type="content_policy_violation",
                    metadata=meta, lcpp_type="permission_error")


def _availability(status: int, code: str, retryable: bool, wait: float | None, ctx: ErrorContext,
                  message: str) -> SimError:
    avail: dict[str, Any] = {"code": code, "retryable": retryable, "requested_models": [ctx.model],
                             "docs_url": "https://openrouter.ai/docs/api/reference/errors-and-debugging"}
    if wait is not None:
        avail["retry_after"] = wait
    err_type = "rate_limit_exceeded" if status == 429 else "provider_overloaded"
    oa_type = "requests" if status == 429 else "server_error"
    oa_code = "rate_limit_exceeded" if status == 429 else None
    return SimError(status, message, oa_type, oa_code, error_type=err_type, availability=avail, retry_after=wait)


def edge_timeout_error(flavor: str) -> SimError:
    if flavor == "openrouter":
        return generic_error(524)
    return generic_error(408)
