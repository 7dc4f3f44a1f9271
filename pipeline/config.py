"""The job description: a closed, typed config, validated once.

Every section rejects unknown keys (with a "did you mean" hint), and every error names the dotted key
and the file. Relative paths resolve against the config file's folder. The API key is never part of
the config: it is read from the environment variable named by `endpoint.api_key_env`, at the moment it
is needed, and kept out of every repr.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import yaml_loader
from .errors import ConfigError

StructuredMode = Literal["auto", "json_schema", "json_object", "tool"]
DEFAULT_BATCH_SIZE = 1000
IMAGE_BATCH_SIZE = 64


class Section(BaseModel):
    # allow_inf_nan=False: an infinite backoff or rate is never meant, and one silently hung a run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class InputConfig(Section):
    path: str = Field(description="A Parquet or JSONL file, a glob, or a folder of them.")
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="Forced format; auto uses the extension.")
    id_column: str | None = Field(None, description="Unique row id column; default: a hash of the row content.")
    columns: list[str] = Field(default_factory=list, description="Input columns carried into results.parquet.")
    batch_size: int | None = Field(
        None, ge=1, le=100_000,
        description="Rows per streaming batch; default 1000, or 64 when prompt.images is set (image payloads are "
                    "large, and a few open batches are held in memory).",
    )
    limit: int | None = Field(
        None, ge=1, description="Only the first N rows (`--limit N`): a cheap trial; outputs and resume are those "
                                "of a job over these rows. Not part of the job's identity.",
    )
    # -- object storage (pipeline/read/storage.py) --
    storage_options: dict[str, Union[str, int, float, bool]] = Field(
        default_factory=dict,
        description="For s3:// and gs:// paths: pyarrow S3FileSystem/GcsFileSystem arguments (region, "
                    "endpoint_override, access_key, ...) over the standard environment and config chain.",
    )


# HTTP header names are RFC 9110 tokens: no whitespace, no separators, no CR/LF.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CREDENTIAL_HEADER = re.compile(r"authorization|api[-_]?key|token|secret|password|cookie", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_header(name: str, value: str) -> None:
    """What HTTP allows: a token for the name; no CR, LF or NUL in the value (header injection)."""
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only; "
                         "no spaces or line breaks)")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"the value of header {name!r} holds a line break or NUL, which HTTP does not allow")


def _header_safe(value: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in value)


class EndpointConfig(Section):
    base_url: str = Field("https://openrouter.ai/api/v1", description="API root, or 'simulator'.")
    model: str = Field("openai/gpt-4-turbo", min_length=1)
    api_key_env: str = Field("OPENROUTER_API_KEY", min_length=1, description="Env var holding the key.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers, e.g. HTTP-Referer, X-Title.")
    app_url: str | None = Field(None, description="Your app's URL, sent as HTTP-Referer (OpenRouter attribution).")
    app_title: str | None = Field(None, description="Your app's name, sent as X-OpenRouter-Title and X-Title.")
    timeout_s: float = Field(600.0, gt=0, description="Total time one attempt may take.")
    read_timeout_s: float = Field(120.0, gt=0, description="Longest silence between two reads.")
    connect_timeout_s: float = Field(15.0, gt=0)
    simulator: dict[str, Any] = Field(
        default_factory=dict, description="SimConfig options when base_url is 'simulator'."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v != "simulator" and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as https://openrouter.ai/api/v1, or 'simulator'")
        return v.rstrip("/")

    secret_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Header name -> environment variable holding its value (e.g. {api-key: AZURE_OPENAI_KEY}); "
                    "the values never enter a file, the manifest or the job fingerprint, and are scrubbed from "
                    "everything the server sends back.",
    )

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            # A credential here would be written wherever the config or the resume command goes.
            if name.strip().lower() == "authorization":
                raise ValueError("do not put Authorization here; set the key in the env var named by "
                                 "endpoint.api_key_env")
            if _CREDENTIAL_HEADER.search(name):
                raise ValueError(f"{name!r} looks like a credential: do not put it in headers; give it from the "
                                 f"environment with endpoint.secret_headers: {{{name.strip()}: ENV_VAR_NAME}}")
            _check_header(name, value)
        return v

    @field_validator("secret_headers")
    @classmethod
    def _secret_headers(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        plain = {k.lower() for k in info.data.get("headers") or {}}
        for name, env in v.items():
            _check_header(name, "")
            if name.lower() == "authorization":
                raise ValueError("the Authorization header is built from endpoint.api_key_env; set that instead")
            if name.lower() in plain:
                raise ValueError(f"{name!r} is also in endpoint.headers; set it in one place")
            if not _ENV_NAME.match(env):
                raise ValueError(f"{name}: give the NAME of an environment variable (letters, digits, _), "
                                 f"not the value")
        return v

    def secret_header_values(self, file: str | None = None) -> dict[str, str]:
        """The secret headers' values from the environment; ConfigError naming the key when one is missing."""
        from .send import redact

        out: dict[str, str] = {}
        for name, env in self.secret_headers.items():
            value = os.environ.get(env, "")
            if not value.strip():
                raise ConfigError(f"the environment variable {env} is not set (export {env}=...)",
                                  key=f"endpoint.secret_headers.{name}", file=file)
            if not _header_safe(value.strip()):
                raise ConfigError(f"the value of {env} holds a line break or a character an HTTP header cannot "
                                  "carry (printable ASCII only)", key=f"endpoint.secret_headers.{name}", file=file)
            out[name] = redact.register(value.strip())
        return out

    @field_validator("app_url", "app_title")
    @classmethod
    def _app_headers_agree(cls, v: str | None, info: ValidationInfo) -> str | None:
        # A field validator (headers is declared first) so the error names endpoint.app_url / app_title.
        names = ("HTTP-Referer",) if info.field_name == "app_url" else ("X-OpenRouter-Title", "X-Title")
        _check_header(names[0], v or "")
        given = {k.lower(): val for k, val in (info.data.get("headers") or {}).items()}
        for name in names:
            if v is not None and given.get(name.lower(), v) != v:
                raise ValueError(f"contradicts headers.{name} ({given[name.lower()]!r}); set it in one place")
        return v

    def _app_headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.app_url:
            out["HTTP-Referer"] = self.app_url
        if self.app_title:
            # OpenRouter's current title header, plus the legacy one it still honours (wire-facts §1.1).
            out["X-OpenRouter-Title"] = self.app_title
            out["X-Title"] = self.app_title
        return out

    def public_headers(self) -> dict[str, str]:
        """The headers that are not secret: app attribution, then `headers` (which win on case)."""
        given = {k.lower() for k in self.headers}
        return {**{k: v for k, v in self._app_headers().items() if k.lower() not in given}, **self.headers}

    def request_headers(self, file: str | None = None) -> dict[str, str]:
        """Headers sent with every request: the public ones, then the secret headers read from the
        environment now."""
        return {**self.public_headers(), **self.secret_header_values(file)}


class PromptConfig(Section):
    system: str | None = Field(None, description="Jinja2 template for the system message.")
    user: str | None = Field(None, description="Jinja2 template for the user message.")
    messages_column: str | None = Field(None, description="Column holding ready-made chat messages.")
    images: list[str] = Field(default_factory=list, description="Columns holding images (URL, path, bytes, list).")
    image_detail: Literal["auto", "low", "high"] = "auto"
    image_max_side: int | None = Field(None, ge=16, description="Downscale local images to this longest side.")
    image_roots: list[str] = Field(
        default_factory=list,
        description="More folders local image paths may resolve into (relative to the config file); the input "
                    "file's folder is always allowed, anything else in a row is refused.",
    )

    @model_validator(mode="after")
    def _has_prompt(self) -> "PromptConfig":
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
    sort: Union[Literal["price", "throughput", "latency"], dict[str, Any], None] = None
    preferred_min_throughput: Union[float, dict[str, float], None] = None
    preferred_max_latency: Union[float, dict[str, float], None] = None
    max_price: dict[str, float] | None = None


class ParamsConfig(Section):
    """Request body fields. Absent fields are not sent, so the provider's defaults apply."""

    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: Union[str, list[str], None] = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None
    structured_outputs: bool | None = None
    stream: bool = False
    models: list[str] | None = Field(None, description="OpenRouter model fallback list.")
    provider: ProviderConfig | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other body field, sent untouched.")
    from_columns: dict[str, str] = Field(
        default_factory=dict, description="Body field -> input column, for per-row values (seed, max_tokens...)."
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> Union[str, list[str], None]:
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

    @field_validator("top_logprobs")
    @classmethod
    def _logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        # A field validator (logprobs is declared first) so the error names params.top_logprobs.
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires params.logprobs: true")
        return v


class StructuredConfig(Section):
    schema_: Union[dict[str, Any], str, None] = Field(
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


class LimitsConfig(Section):
    requests_per_minute: float | None = Field(500, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
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


class OutputConfig(Section):
    dir: str
    fsync_interval_s: float = Field(1.0, gt=0, le=60)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    metrics_file: str | None = Field(
        None, description="Write the job's figures here in the Prometheus text format (node_exporter's textfile "
                          "collector), atomically, every 30 s during a run and at its end.",
    )
    # -- object storage (pipeline/read/storage.py) --
    publish: str | None = Field(
        None, description="An s3:// or gs:// folder: the local engine copies results.parquet, failures.parquet "
                          "and summary.json there at the end, each file complete or not at all.")
    storage_options: dict[str, Union[str, int, float, bool]] = Field(
        default_factory=dict, description="Filesystem arguments for output.publish and an object-store output.dir.")


class NotifyConfig(Section):
    webhook: str | None = Field(None, description="POST the run record (JSON) to this URL when a run ends.")
    on: list[Literal["failure", "success"]] = Field(
        default_factory=lambda: ["failure"], description="When to POST: failure (exit code not 0), success (exit 0).",
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Time one POST may take.")
    retries: int = Field(3, ge=0, le=10, description="Further POSTs when the receiver cannot be reached or answers 5xx.")

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return v


class CacheConfig(Section):
    dir: str | None = Field(None, description="Cross-run response cache shared by several jobs.")


class Price(Section):
    """A model's price in USD, overriding the genai-prices library (pipeline/models/prices.py)."""

    input_per_m: float = Field(ge=0, description="Per million prompt tokens.")
    output_per_m: float = Field(ge=0, description="Per million completion tokens.")
    per_image: float = Field(0.0, ge=0, description="Per input image, for providers that bill images apart.")
    cached_input_per_m: float | None = Field(
        None, ge=0, description="Per million cached prompt tokens (usage.prompt_tokens_details); absent: input_per_m.")
    batch_input_per_m: float | None = Field(
        None, ge=0, description="Batch API price per million prompt tokens; absent: half of input_per_m.")
    batch_output_per_m: float | None = Field(
        None, ge=0, description="Batch API price per million completion tokens; absent: half of output_per_m.")


class RunConfig(Section):
    grace_period_s: float = Field(30.0, ge=0, description="How long in-flight requests may finish on Ctrl-C.")
    progress: bool = True
    mode: Literal["sync", "batch"] = Field(
        "sync", description="sync: chat completions as the rows stream by; batch: the provider's Batch API "
                            "(OpenAI protocol, half price, answers within 24 h). The same request keys in both.")
    progress_interval_s: float = Field(
        30.0, gt=0, le=3600, description="When stderr is not a terminal (cron, a log file): one plain status line "
                                         "this often instead of a redrawn bar.",
    )

    # -- the Ray engine (pipeline/engines/ray/) --
    engine: Literal["local", "ray"] = Field("local", description="local: one process; ray: Ray Data actors.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); default: start a local instance.")
    workers: int = Field(4, ge=1, le=4096, description="Ray engine: actors sending requests (limits are shared).")


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


class Config(Section):
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

    # Where the config came from; not part of the YAML.
    source: str = Field("<dict>", exclude=True)

    @model_validator(mode="after")
    def _default_batch_size(self) -> "Config":
        if self.input.batch_size is None:
            self.input.batch_size = IMAGE_BATCH_SIZE if self.prompt.images else DEFAULT_BATCH_SIZE
        return self

    def api_key(self) -> str:
        """The key from the environment; a clear error (never the value) when it is missing."""
        from .send import redact

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
        keep = {
            "endpoint": {"base_url": self.endpoint.base_url, "model": self.endpoint.model},
            "prompt": self.prompt.model_dump(exclude={"image_roots"}),  # where files may be read, not what is asked
            "params": self.params.model_dump(exclude_none=True),
            "structured": self.structured.model_dump(by_alias=True) if self.structured else None,
        }
        # NON_STR_KEYS: params.logit_bias is keyed by token id (int).
        loaded: dict[str, Any] = orjson.loads(orjson.dumps(keep, option=orjson.OPT_NON_STR_KEYS, default=str))
        return loaded

    def request_fingerprint(self) -> str:
        """Hash of `request_config()`: a resume with a different one would mix answers to other requests."""
        return hashlib.sha256(orjson.dumps(self.request_config(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(
    source: Union[str, Path, dict[str, Any], Config],
    overrides: Union[list[str], dict[str, Any], None] = None,
) -> Config:
    """Read, override and validate a config once. Raises ConfigError naming the key and file."""
    if isinstance(source, Config):
        if not overrides:
            return source
        raw, base, name = source.model_dump(by_alias=True, exclude={"source"}), Path.cwd(), source.source
    elif isinstance(source, dict):
        raw, base, name = _deep_copy(source), Path.cwd(), "<dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError("config file not found (give the path to a .yaml file)", file=name)
        try:
            raw = yaml_loader.load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=name) from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a mapping of sections (input, endpoint, prompt, ...)", file=name)
        base = path.resolve().parent
    for key, value in _normalise_overrides(overrides).items():
        _set_dotted(raw, key, value, name)
    yaml_loader.check_shape(raw, name)  # before validation and the fingerprint walk it recursively
    try:
        cfg = Config.model_validate({**raw, "source": name})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, raw), file=name) from None
    _resolve_paths(cfg, base)
    _check_budget_price(cfg)
    from .build.templates import check_prompt  # compiled before any input is read or anything is sent

    check_prompt(cfg.prompt, name)
    _check_batch_mode(cfg)
    return cfg


def _check_batch_mode(cfg: Config) -> None:
    """A Batch API line is answered whole, never streamed; batch mode is a mode of the local engine."""
    if cfg.run.mode == "batch" and cfg.run.engine != "local":
        raise ConfigError("run.mode: batch runs on run.engine: local (the provider does the work; the local "
                          "driver only writes files and polls)", key="run.engine", file=cfg.source)
    if cfg.run.mode == "batch" and cfg.params.stream:
        raise ConfigError("run.mode: batch cannot stream answers; remove params.stream (or use run.mode: sync)",
                          key="params.stream", file=cfg.source)


def _check_budget_price(cfg: Config) -> None:
    """A budget is only enforceable when the worst case of a request in flight can be priced."""
    if cfg.budget.max_cost_usd is None:
        return
    from .models.prices import find_price, missing_price_hint  # the library loads only when a budget is set

    for model in [cfg.endpoint.model, *(cfg.params.models or [])]:
        if find_price(cfg, model) is None:
            raise ConfigError(f"needs a price for {model!r} to count requests in flight at their maximum cost; "
                              + missing_price_hint(model), key="budget.max_cost_usd", file=cfg.source)


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _normalise_overrides(overrides: Union[list[str], dict[str, Any], None]) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return overrides
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE with a dotted key (e.g. output.dir=/tmp/x), got {item!r}")
        try:
            out[key.strip()] = yaml_loader.load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any, file: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:  # absent, or an optional section dumped as null (structured: None)
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section", key=key, file=file)
        node = nxt
    node[parts[-1]] = value


def _explain(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        # pydantic puts union member names in the location; they mean nothing to a user.
        loc = [p for p in loc if p not in {"str", "list[str]", "dict[str,any]"} and not p.startswith("literal[")]
        dotted = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(loc)
            lines.append(f"{dotted}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{dotted}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            # Header values may be credentials: never echo them into a message.
            got = "" if dotted.startswith("endpoint.headers") else f" (got {_short(err.get('input'))})"
            lines.append(f"{dotted}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _did_you_mean(loc: list[str]) -> str:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return ""
        model = inner[0]
    names = []
    for fname, f in model.model_fields.items():
        if fname == "source":
            continue
        names.append(f.alias or fname)
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known keys: {', '.join(sorted(names))}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(p: str) -> str:
        expanded = os.path.expanduser(p)
        return os.path.normpath(expanded if os.path.isabs(expanded) else str(base / expanded))

    if "://" not in cfg.input.path:  # object-store URIs are absolute already
        cfg.input.path = resolve(cfg.input.path)
    if "://" not in cfg.output.dir:
        cfg.output.dir = resolve(cfg.output.dir)
    if cfg.output.metrics_file:
        cfg.output.metrics_file = resolve(cfg.output.metrics_file)
    if cfg.cache.dir:
        cfg.cache.dir = resolve(cfg.cache.dir)
    cfg.prompt.image_roots = [resolve(r) for r in cfg.prompt.image_roots]
    if cfg.structured and isinstance(cfg.structured.schema_, str):
        # Load the file now so the job fingerprint covers the schema's content, not its path.
        path = Path(resolve(cfg.structured.schema_))
        try:
            loaded = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"schema file {path} not found", key="structured.schema", file=cfg.source) from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder; give the path to a JSON Schema file (.json)",
                              key="structured.schema", file=cfg.source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read schema file {path}: {exc.strerror or exc}", key="structured.schema",
                              file=cfg.source) from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"schema file {path} is not valid JSON: {exc}", key="structured.schema",
                              file=cfg.source) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"schema file {path} must hold a JSON object", key="structured.schema", file=cfg.source)
        yaml_loader.check_shape(loaded, cfg.source, "structured.schema")
        cfg.structured.schema_ = loaded
