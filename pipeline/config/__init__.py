"""The job description: a closed, typed config, validated once.

Every section rejects unknown keys (with a "did you mean" hint), and every error names the dotted key
and the file. Relative paths resolve against the config file's folder. The API key is never part of
the config: it is read from the environment variable named by `endpoint.api_key_env`, at the moment it
is needed, and kept out of every repr.

Modules: base (the closed Section), io (input, output, cache, run), endpoint (endpoint, headers, secret
headers), request (prompt, params, provider, structured), limits (limits, budget, prices, batch, notify),
job (the whole Config, API key, job fingerprint), loading (load_config, --set overrides, error messages),
secrets (`!env` / `!secret` values and the keys secret by default).
New keys go into the module of their section.
"""
from __future__ import annotations

from .base import Section
from .endpoint import EndpointConfig
from .io import (
    DEFAULT_BATCH_SIZE,
    IMAGE_BATCH_SIZE,
    CacheConfig,
    InputConfig,
    OutputConfig,
    RunConfig,
)
from .job import Config, JobConfig
from .limits import BatchConfig, BudgetConfig, LimitsConfig, NotifyConfig, Price
from .loading import day_note, load_config
from .request import (
    ParamsConfig,
    PromptConfig,
    ProviderConfig,
    StructuredConfig,
    StructuredMode,
)
from .secrets import FromEnv, Secret

__all__ = [
    "DEFAULT_BATCH_SIZE", "IMAGE_BATCH_SIZE", "BatchConfig", "BudgetConfig", "CacheConfig", "Config",
    "EndpointConfig", "FromEnv", "InputConfig", "JobConfig", "LimitsConfig", "NotifyConfig", "OutputConfig",
    "ParamsConfig", "Price", "PromptConfig", "ProviderConfig", "RunConfig", "Secret", "Section", "StructuredConfig",
    "StructuredMode", "day_note", "load_config",
]
