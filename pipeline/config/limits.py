"""How much and how fast: rate limits, budget, model prices, Batch API files and run-end notifications."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section
from .endpoint import check_http_url


class LimitsConfig(Section):
    requests_per_minute: float | None = Field(500, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    input_tokens_per_minute: float | None = Field(
        None, gt=0, description="Prompt tokens a minute (Anthropic ITPM, Databricks); cached reads are not "
                                "counted for models whose provider exempts them.")
    output_tokens_per_minute: float | None = Field(
        None, gt=0, description="Completion tokens a minute (OTPM): max_tokens is reserved when a request is "
                                "sent and the unused part returned with the answer.")
    max_concurrency: int = Field(64, ge=1, le=4096)
    max_retries: int = Field(6, ge=0, le=100, description="Transient retries per request.")
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    max_retry_after_s: float = Field(900.0, gt=0, description="A longer server wait fails the request instead.")
    # Half a second: a server that enforces per second (as OpenAI may) never sees our opening burst plus
    # the refill exceed its one-second bucket, even with arrival jitter.
    burst_s: float = Field(0.5, gt=0, description="Seconds of quota that may go out at once (smooth dispatch).")
    adaptive: bool = Field(True, description="Learn limits from rate-limit headers and 429s.")


class BudgetConfig(Section):
    max_cost_usd: float | None = Field(None, gt=0)


class Price(Section):
    """A model's price in USD, overriding the genai-prices library (pipeline/models/prices.py)."""

    input_per_m: float = Field(ge=0, description="Per million prompt tokens.")
    output_per_m: float = Field(ge=0, description="Per million completion tokens.")
    per_image: float = Field(0.0, ge=0, description="Per input image, for providers that bill images apart.")
    cached_input_per_m: float | None = Field(
        None, ge=0, description="Per million cached prompt tokens (usage.prompt_tokens_details); absent: input_per_m.")
    cache_write_per_m: float | None = Field(
        None, ge=0, description="Per million prompt tokens written to the provider's cache; absent: input_per_m.")
    batch_input_per_m: float | None = Field(
        None, ge=0, description="Batch API price per million prompt tokens; absent: half of input_per_m.")
    batch_output_per_m: float | None = Field(
        None, ge=0, description="Batch API price per million completion tokens; absent: half of output_per_m.")



class BatchConfig(Section):
    """run.mode: batch — how the job is cut into Batch API files and how the run waits for them."""

    max_requests: int = Field(50_000, ge=1, le=50_000, description="Lines per batch file (provider cap 50,000).")
    max_bytes: int = Field(200_000_000, ge=1024, le=200_000_000,
                           description="Bytes per batch file (provider cap 200 MB).")
    max_enqueued_tokens: int | None = Field(
        None, ge=1, description="Estimated prompt tokens in flight for the model at once (the provider's queue "
                                "limit); further files wait until earlier batches finish.")
    poll_interval_s: float = Field(60.0, gt=0, description="First wait between polls of running batches.")
    poll_max_interval_s: float = Field(600.0, gt=0, description="Polls back off (with jitter) up to this.")
    retry_via: Literal["batch", "sync"] = Field(
        "batch", description="Where lines that failed transiently (429, 5xx, expired) go: the next batch file, "
                             "or synchronous requests at the full price once the batches are collected.")
    delete_files: bool = Field(
        True, description="Delete the job's input, output and error files at the provider once their answers are "
                          "committed (they count against the organisation's file storage).")



class NotifyConfig(Section):
    webhook: str | None = Field(None, description="POST the run record (JSON) to this URL when a run ends.")
    on: list[Literal["failure", "success"]] = Field(
        ["failure"], description="When to POST: failure (exit code not 0), success (exit 0).",
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Time one POST may take.")
    retries: int = Field(3, ge=0, le=10,
                         description="Further POSTs when the receiver cannot be reached or answers 5xx.")
    format: Literal["json", "slack", "teams"] = Field(
        "json", description="json: the run record as it is; slack: {text} for a Slack incoming webhook; teams: a "
                            "MessageCard for a Microsoft Teams incoming webhook (the record's figures in one line).")

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            check_http_url(v, "https://hooks.example/pipeline")
        return v
