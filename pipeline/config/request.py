"""What is asked: the prompt, request params (with provider routing) and structured-output sections."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

StructuredMode = Literal["auto", "json_schema", "json_object", "tool"]


class PromptConfig(Section):
    system: str | None = Field(None, description="Jinja2 template for the system message.")
    user: str | None = Field(None, description="Jinja2 template for the user message.")
    messages_column: str | None = Field(None, description="Column holding ready-made chat messages.")
    images: list[str] = Field(default_factory=list, description="Columns holding images (URL, path, bytes, list).")
    rows_per_request: int = Field(
        1, ge=1, le=100,
        description="Rows asked in one request (a pack): they share one copy of the instructions; each row's "
                    "answer comes back under its own id and lands as its own result row. 1: one by one.")
    image_detail: Literal["auto", "low", "high"] = "auto"
    image_max_side: int | None = Field(None, ge=16, description="Downscale local images to this longest side.")
    cache: Literal["auto", "off"] = Field(
        "auto", description="Provider prompt caching: shared text first, cache_control / prompt_cache_key hints.")
    image_roots: list[str] = Field(
        default_factory=list,
        description="More folders local image paths may resolve into (relative to the config file); the input "
                    "file's folder is always allowed, anything else in a row is refused.",
    )

    @model_validator(mode="after")
    def _has_prompt(self) -> PromptConfig:
        if not self.user and not self.messages_column:
            raise ValueError("set prompt.user (a template) or prompt.messages_column")
        return self


class ProviderConfig(Section):
    """OpenRouter provider routing preferences, passed through as `provider`."""

    order: list[str] | None = None
    allow_fallbacks: bool | None = None
    require_parameters: bool | None = None
    data_collection: Literal["allow", "deny"] | None = None
    zdr: bool | None = None
    enforce_distillable_text: bool | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    quantizations: list[str] | None = None
    sort: Literal["price", "throughput", "latency"] | dict[str, Any] | None = None
    preferred_min_throughput: float | dict[str, float] | None = None
    preferred_max_latency: float | dict[str, float] | None = None
    max_price: dict[str, float] | None = None


class ParamsConfig(Section):
    """Request body fields. Absent fields are not sent, so the provider's defaults apply."""

    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: bool | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        None, description="OpenAI processing tier; flex: Batch API prices on ordinary requests, slower, "
                          "longer default timeouts.")
    stream: bool = False
    models: list[str] | None = Field(None, description="OpenRouter model fallback list.")
    provider: ProviderConfig | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other body field, sent untouched.")
    from_columns: dict[str, str] = Field(
        default_factory=dict, description="Body field -> input column, for per-row values (seed, max_tokens...)."
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not 1 <= len(v) <= 4:
            raise ValueError("give a string or a list of 1 to 4 strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for tok, bias in (v or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {tok} is {bias}; it must be between -100 and 100")
        return v


class StructuredConfig(Section):
    schema_: dict[str, Any] | str | None = Field(
        None, alias="schema", description="JSON Schema inline, or a path to a .json file."
    )
    mode: StructuredMode = "auto"
    name: str = Field("output", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    strict: bool = True
    bad_content_retries: int = Field(2, ge=0, le=20)
    length_max_tokens: int | None = Field(
        None, ge=1, description="On finish_reason=length, retry once with this max_tokens (else fail)."
    )
    capabilities: dict[str, list[Literal["json_schema", "json_object", "tool"]]] = Field(
        default_factory=dict, description="Model glob -> modes it supports, best first (adds to built-ins)."
    )
