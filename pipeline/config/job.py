"""The whole job description (`Config`): its sections, the API key from the environment, and the job's
identity (request_config / request_fingerprint)."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import orjson
from pydantic import Field, model_validator

from ..errors import ConfigError
from .base import Section
from .endpoint import EndpointConfig, _header_safe
from .io import (
    DEFAULT_BATCH_SIZE,
    IMAGE_BATCH_SIZE,
    CacheConfig,
    InputConfig,
    OutputConfig,
    RunConfig,
)
from .limits import BatchConfig, BudgetConfig, LimitsConfig, NotifyConfig, Price
from .quality import CascadeStage, QualityConfig
from .request import ParamsConfig, PromptConfig, StructuredConfig

FLEX_TIMEOUT_S = 900.0

# Keys once recorded in a job's identity that no longer shape requests: a job folder that recorded them
# is compared without them (state/jobdir.py), so upgrading never makes it "a different job".
NOT_IDENTITY: tuple[tuple[str, str], ...] = (("structured", "bad_content_retries"),)


class JobConfig(Section):
    """Naming the job for people and dashboards; not part of what the job asks (not its identity)."""

    name: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                             description="The job's name in the webhook, the metrics' job label and "
                                         "`pipeline status` (default: the output folder).")


class Config(Section):
    job: JobConfig = Field(default_factory=JobConfig)
    input: InputConfig
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    prompt: PromptConfig
    params: ParamsConfig = Field(default_factory=ParamsConfig)
    structured: StructuredConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    output: OutputConfig
    cache: CacheConfig = Field(default_factory=CacheConfig)
    prices: dict[str, Price] = Field(
        default_factory=dict, description="Model -> price; overrides the genai-prices library's table.")
    run: RunConfig = Field(default_factory=RunConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    cascade: list[CascadeStage] | None = Field(
        None, description="Models tried in turn: rows under a stage's min_confidence go on; the last decides.")

    # Where the config came from; not part of the YAML.
    source: str = Field("<dict>", exclude=True)

    @model_validator(mode="after")
    def _default_batch_size(self) -> Config:
        if self.input.batch_size is None:
            self.input.batch_size = IMAGE_BATCH_SIZE if self.prompt.images else DEFAULT_BATCH_SIZE
        return self

    @model_validator(mode="after")
    def _flex_timeouts(self) -> Config:
        # Flex requests queue for capacity: OpenAI advises 15-minute timeouts. Only where none was set.
        if self.params.service_tier == "flex":
            for name in ("timeout_s", "read_timeout_s"):
                if name not in self.endpoint.model_fields_set and getattr(self.endpoint, name) < FLEX_TIMEOUT_S:
                    setattr(self.endpoint, name, FLEX_TIMEOUT_S)
        return self

    @model_validator(mode="after")
    def _cascade_first_model(self) -> Config:
        # The first stage is the run's model: its prices, token counts and structured mode are the run's.
        if self.cascade and self.endpoint.model != self.cascade[0].model:
            self.endpoint.model = self.cascade[0].model
        return self

    def sample_config(self, index: int) -> Config:
        """Vote `index` of quality.votes sent as its own request: the same job with seed + index."""
        params = self.params.model_copy(update={"seed": (self.params.seed or 0) + index})
        return self.model_copy(update={"params": params})

    def stage_config(self, model: str) -> Config:
        """This job asked of another model (a cascade stage, the audit's reference model)."""
        if model == self.endpoint.model:
            return self
        endpoint = self.endpoint.model_copy(update={"model": model})
        return self.model_copy(update={"endpoint": endpoint})

    def api_key(self) -> str:
        """The key from the environment; a clear error (never the value) when it is missing."""
        from ..common import redact

        if self.endpoint.base_url == "simulator":
            self.endpoint.secret_header_values(self.source)
            return redact.register(os.environ.get(self.endpoint.api_key_env) or "sk-simulator")
        key = os.environ.get(self.endpoint.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"the API key is missing: set the environment variable {self.endpoint.api_key_env} "
                f"(export {self.endpoint.api_key_env}=...) or name another one with endpoint.api_key_env",
                key="endpoint.api_key_env",
                file=self.source,
            )
        if not _header_safe(key):
            raise ConfigError(f"the value of {self.endpoint.api_key_env} holds a line break or a character an "
                              "HTTP header cannot carry (printable ASCII only)", key="endpoint.api_key_env",
                              file=self.source)
        self.endpoint.secret_header_values(self.source)  # every secret the run needs, checked at start
        return redact.register(key)

    def request_config(self) -> dict[str, Any]:
        """Everything that shapes what is asked: the job's identity, as plain JSON. The input is data (it may
        grow or change between runs), and limits, budget, output, carried columns and progress may change
        freely."""
        keep: dict[str, Any] = {
            "endpoint": {"base_url": self.endpoint.base_url, "model": self.endpoint.model},
            "prompt": self._prompt_identity(),
            "params": self.params.model_dump(exclude_none=True),
            # A retry budget changes how often we ask, not what: not the job (NOT_IDENTITY).
            "structured": self.structured.model_dump(by_alias=True, exclude={"bad_content_retries"})
            if self.structured else None,
        }
        if self.quality.confidence != "off":  # only when on: older jobs keep their fingerprint
            keep["quality"] = self.quality.body_fields(keep["params"], self.endpoint.base_url)
        if self.cascade:
            keep["cascade"] = [stage.model for stage in self.cascade]
        # NON_STR_KEYS: params.logit_bias is keyed by token id (int).
        loaded: dict[str, Any] = orjson.loads(orjson.dumps(keep, option=orjson.OPT_NON_STR_KEYS, default=str))
        # A secret value (`!secret`, `!env`) is the mask here: the identity is written to manifest.json and the
        # store, and a rotated secret does not make another job (the request key still covers the value).
        from ..common import redact

        scrubbed: dict[str, Any] = redact.scrub_any(loaded)
        return scrubbed

    def _prompt_identity(self) -> dict[str, Any]:
        # image_roots: where files may be read, not what is asked. rows_per_request: one by one and packed
        # are different requests, but a packed row's request does not depend on how many share its pack,
        # and a job from before packing existed must keep its identity. cache: caching hints are not what
        # is asked (the request key leaves them out too, prepare/caching.py).
        prompt = self.prompt.model_dump(exclude={"image_roots", "rows_per_request", "cache"})
        if self.prompt.rows_per_request > 1:
            prompt["rows_per_request"] = "several"
        return prompt

    def request_fingerprint(self) -> str:
        """Hash of `request_config()`: a resume with a different one would mix answers to other requests."""
        return hashlib.sha256(orjson.dumps(self.request_config(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
