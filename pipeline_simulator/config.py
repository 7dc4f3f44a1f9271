"""Simulator configuration: one closed pydantic model plus the scripted fault plan.

Every field has a default, so ``SimConfig()`` is a healthy zero-latency OpenRouter look-alike.
Random fault rates are per-arrival probabilities drawn from ``random.Random(seed)``; scripted
faults (``fault_plan``) address arrivals by their 1-based number and win over random draws.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

Flavor = Literal["openrouter", "openai", "vllm", "llamacpp"]

# Faults a random rate can draw, in the fixed order the single per-arrival uniform draw walks them.
RATE_FAULTS: tuple[str, ...] = (
    "429", "500", "502", "503", "hang", "reset", "malformed", "schema_invalid",
    "length", "refusal", "error_200", "empty",
)

# Every named fault a FaultRule may ask for; any other 3-digit HTTP status is accepted as well
# and gets a generic envelope for that status.
FAULT_NAMES: frozenset[str] = frozenset({
    "400", "401", "402", "402_afford", "403", "403_key", "404", "408", "413", "422",
    "429", "429_quota", "429_too_large", "429_capacity", "429_flex",
    "500", "502", "503", "503_unavailable", "503_slow_down", "504", "524", "529",
    "hang", "reset", "malformed", "schema_invalid", "length", "refusal",
    "error_200", "error_200_partial", "empty", "model_down",
    "stream_error", "stream_error_legacy", "stream_truncate", "stream_no_usage",
})

_RANGE_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d*)\s*)?$")


class FaultRule(BaseModel):
    """One scripted fault: ``requests`` picks arrivals ("17", "100-140", "3,5,9-12", "40-", "*")."""

    model_config = ConfigDict(extra="forbid")

    requests: str
    fault: str
    retry_after: float | None = None  # seconds for Retry-After (429/503/529/402 in-flight budget)
    status: int | None = None  # error code carried by error_200 / stream_error bodies
    message: str | None = None  # replaces the default error message
    after_chunks: int | None = None  # content chunks sent before stream_error / stream_truncate
    done: bool | None = None  # send ``data: [DONE]`` after a stream_error (default SimConfig)

    _spans: list[tuple[int, int]] = PrivateAttr(default_factory=list)

    @field_validator("requests", mode="before")
    @classmethod
    def _coerce_requests(cls, value: Any) -> str:
        return str(value)

    @field_validator("fault", mode="before")
    @classmethod
    def _check_fault(cls, value: Any) -> str:
        name = str(value)
        if name not in FAULT_NAMES and not re.fullmatch(r"[1-5]\d\d", name):
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULT_NAMES))}")
        return name

    @model_validator(mode="after")
    def _parse_spans(self) -> FaultRule:
        spans: list[tuple[int, int]] = []
        for part in self.requests.split(","):
            if part.strip() == "*":
                spans.append((1, 1 << 62))
                continue
            m = _RANGE_PART.match(part)
            if not m:
                raise ValueError(f"requests={self.requests!r}: expected N, N-M, N- or *, comma separated")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(2)) if m.group(2) else 1 << 62)
            if lo < 1 or hi < lo:
                raise ValueError(f"requests={self.requests!r}: ranges are 1-based and ascending")
            spans.append((lo, hi))
        self._spans = spans
        return self

    def matches(self, arrival: int) -> bool:
        return any(lo <= arrival <= hi for lo, hi in self._spans)


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_m: float = 10.0  # USD per million prompt tokens
    output_per_m: float = 30.0  # USD per million completion tokens
    cached_input_per_m: float | None = None  # cached prompt tokens; None: the input price
    cache_write_per_m: float | None = None  # prompt tokens written to the cache; None: the input price


class BatchSim(BaseModel):
    """The Batch API (files + batches). Status moves one step per poll count below, on the simulator's own
    clock (each GET of the batch is a tick), so tests never sleep."""

    model_config = ConfigDict(extra="forbid")

    validating_polls: int = Field(default=1, ge=0)  # polls answered "validating" before the next status
    in_progress_polls: int = Field(default=2, ge=0)
    finalizing_polls: int = Field(default=1, ge=0)
    cancelling_polls: int = Field(default=1, ge=0)
    line_rate_4xx: float = Field(default=0.0, ge=0, le=1)  # per line: a 4xx answer (status line_4xx_status)
    line_4xx_status: int = Field(default=400, ge=400, le=499)  # 400 invalid_request; 401/402 stop a client
    line_rate_5xx: float = Field(default=0.0, ge=0, le=1)  # per line: a 500 server_error answer
    line_rate_schema_invalid: float = Field(default=0.0, ge=0, le=1)  # per line: a 200 whose JSON breaks the schema
    line_rate_no_choices: float = Field(default=0.0, ge=0, le=1)  # per line: a 200 billed with `choices: []`
    expire: list[int] = Field(default_factory=list)  # creation numbers (1-based) of batches that expire
    # Batches of these models stay in_progress however often they are polled (a cascade's later stage held,
    # so a test can kill a client in it); empty the list and they go on.
    hold_models: list[str] = Field(default_factory=list)
    expire_done_ratio: float = Field(default=0.5, ge=0, le=1)  # share answered before the window closed
    errors_in_output: bool = False  # failed lines in the output file (some gateways) instead of the error file
    shuffle: bool = True  # output order is not input order
    price_factor: float = Field(default=0.5, ge=0)  # batch price as a share of the sync price
    max_active: int | None = Field(default=None, gt=0)  # 429 on create beyond this many unfinished batches
    max_enqueued_tokens: int | None = Field(default=None, gt=0)  # 429 on create beyond this queue of prompt tokens
    max_file_lines: int = Field(default=50_000, gt=0)
    max_file_bytes: int = Field(default=200_000_000, gt=0)
    list_files: bool = True  # False: GET /files answers 405, as Batch API servers without a files list do
    list_batches: bool = True  # False: GET /batches answers 405 too
    upload_status: int | None = Field(default=None, ge=400, le=599)  # every POST /files answers this status


class SimConfig(BaseModel):
    """All knobs of the simulator; closed to unknown keys so a typo in a fault plan is loud."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    flavor: Flavor = "openrouter"
    seed: int = 0
    api_key: str | None = None  # None: any non-empty bearer token is accepted

    # Latency: mean + uniform jitter, plus a rare long tail; 0 means no sleep at all.
    latency_ms: float = Field(default=0.0, ge=0)
    latency_jitter_ms: float = Field(default=0.0, ge=0)
    latency_tail_prob: float = Field(default=0.0, ge=0, le=1)
    latency_tail_multiplier: float = Field(default=10.0, ge=1)
    latency_per_output_token_ms: float = Field(default=0.0, ge=0)  # total latency grows with the answer
    new_schema_latency_ms: float = Field(default=0.0, ge=0)  # extra once per new json_schema (first use)
    edge_timeout_s: float | None = Field(default=None, gt=0)  # longer requests get 524 (openrouter) or 408
    hang_s: float = Field(default=3600.0, ge=0)

    # Random fault rates (per arrival, summed must stay <= 1).
    rate_429: float = Field(default=0.0, ge=0, le=1)
    rate_500: float = Field(default=0.0, ge=0, le=1)
    rate_502: float = Field(default=0.0, ge=0, le=1)
    rate_503: float = Field(default=0.0, ge=0, le=1)
    rate_hang: float = Field(default=0.0, ge=0, le=1)
    rate_reset: float = Field(default=0.0, ge=0, le=1)
    rate_malformed: float = Field(default=0.0, ge=0, le=1)
    rate_schema_invalid: float = Field(default=0.0, ge=0, le=1)
    rate_length: float = Field(default=0.0, ge=0, le=1)
    rate_refusal: float = Field(default=0.0, ge=0, le=1)
    rate_error_200: float = Field(default=0.0, ge=0, le=1)
    rate_empty: float = Field(default=0.0, ge=0, le=1)
    retry_after_s: float | None = Field(default=1.0, ge=0)  # Retry-After on random 429/503; None omits it
    # Every pack of several rows (a packed request, packs.py) answered wrongly on purpose: ids 2 and 3
    # missing, id 4 answered twice with two different answers, and an answer under id 99, which no pack asks.
    garble_packs: bool = False
    fault_plan: list[FaultRule] = Field(default_factory=list)

    # Enforced limits (token buckets that start full); None = unlimited.
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    tpm_charge: Literal["usage", "max_tokens"] = "usage"  # what a request costs the TPM bucket
    # Seconds of the per-minute limits that may arrive at once: 60 is a bucket holding a whole minute;
    # lower quantizes the limit the way OpenAI may (60,000/min enforced as 1,000/s with 1 s).
    limit_burst_s: float = Field(default=60.0, gt=0, le=60)
    credits_usd: float | None = Field(default=None, ge=0)
    credits_preflight: bool = True  # 402 "can only afford N" when max_tokens would overspend

    # Model behaviour.
    default_model: str = "openai/gpt-4-turbo"
    provider_name: str = "OpenAI"
    context_tokens: int = Field(default=128_000, gt=0)
    max_output_tokens: dict[str, int] = Field(default_factory=lambda: {"gpt-4-turbo": 4096})
    no_json_schema_models: list[str] = Field(default_factory=lambda: ["gpt-4-turbo"])
    default_price: Price | None = None  # every model not in `prices`; None: the model's own list price
    prices: dict[str, Price] = Field(default_factory=dict)  # exact model name -> price
    flex_price_factor: float = Field(default=0.5, ge=0)  # service_tier: flex as a share of the price
    upscale_images: bool = False
    remote_image_size: tuple[int, int] = (1024, 1024)  # assumed for http(s) URLs, never fetched
    cached_tokens_ratio: float = Field(default=0.0, ge=0, le=1)  # share of prompt reported as cached (fixed)
    prefix_caching: bool = True  # automatic prefix caching and cache_control breakpoints (prefix_cache.py)
    # How good each model is (judge.py): the share of enum/boolean fields it gets right against a truth derived
    # from the row, with calibrated logprobs. Models without an entry (and no default) answer at random.
    accuracy: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    default_accuracy: float | None = Field(default=None, ge=0, le=1)
    difficulty_spread: float = Field(default=0.05, gt=0, le=1)  # how gradually a model loses its certainty

    # Streaming.
    stream_comments: int = Field(default=2, ge=0)  # ": OPENROUTER PROCESSING" lines before the first token
    stream_comment_interval_ms: float = Field(default=0.0, ge=0)
    # Keep-alive comments between content chunks too: every interval of a paced stream's gaps, or one
    # before each chunk when the interval is 0 (OpenRouter flavor, like the comments before the first token).
    stream_comments_between: bool = False
    stream_chunk_ms: float = Field(default=0.0, ge=0)  # delay between content chunks
    stream_chunk_chars: tuple[int, int] = (1, 16)  # content delta size range
    stream_split_writes: bool = False  # split frames across TCP writes mid-JSON and mid-"\n\n"
    stream_split_delay_ms: float = Field(default=1.0, ge=0)
    stream_crlf: bool = False
    stream_obfuscation: bool = False  # OpenAI-style "obfuscation" padding field on chunks
    stream_usage_delay_ms: float = Field(default=0.0, ge=0)  # old OpenRouter: usage chunk arrives late
    stream_error_after_chunks: int = Field(default=3, ge=0)
    stream_error_done: bool = False  # whether [DONE] follows a mid-stream error chunk
    # OpenRouter's streaming docs show a string code ("server_error") where the API reference has an int.
    stream_error_code: Literal["int", "string"] = "int"
    vllm_legacy_errors: bool = False  # older vLLM: flat {"object":"error","message",...} error bodies

    # Side endpoints and bookkeeping.
    generation_delay_s: float = Field(default=0.0, ge=0)  # /generation answers 404 until this has passed
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    log_limit: int = Field(default=100_000, ge=0)
    log_body_max_bytes: int = Field(default=16_384, ge=0)  # larger bodies are logged as a size marker
    track_bodies: bool = True  # served_by_body accounting (one small entry per distinct body)
    batch: BatchSim = Field(default_factory=BatchSim)  # the Batch API's schedule, faults and limits

    @model_validator(mode="after")
    def _check_rates(self) -> SimConfig:
        total = sum(getattr(self, "rate_" + name) for name in RATE_FAULTS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.3f}; they must sum to at most 1")
        lo, hi = self.stream_chunk_chars
        if lo < 1 or hi < lo:
            raise ValueError("stream_chunk_chars must be (min >= 1, max >= min)")
        return self

    def price_for(self, model: str) -> Price:
        if model in self.prices:
            return self.prices[model]
        if self.default_price is not None:
            return self.default_price
        from .pricing import list_price

        return list_price(model)

    def api_root_path(self) -> str:
        return "/api/v1" if self.flavor == "openrouter" else "/v1"


def load_fault_plan(path: str | Path) -> list[FaultRule]:
    """Read a fault plan from YAML or JSON: a list of rules, or ``{"fault_plan": [...]}``."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if isinstance(data, dict):
        data = data.get("fault_plan", data.get("faults"))
    if not isinstance(data, list):  # a config-file problem: ValueError like every other one
        raise ValueError(f"{path}: expected a list of fault rules (or a 'fault_plan' key)")  # noqa: TRY004
    return [FaultRule.model_validate(item) for item in data]
