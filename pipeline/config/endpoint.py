"""Where requests go and what they carry: the endpoint section, its headers and secret headers.

Secret header values and the API key come from the environment only, when needed (see job.Config.api_key)."""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from ..errors import ConfigError
from .base import Section

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


def check_http_url(v: str, example: str) -> None:
    """An http(s) URL with a host and a valid port; found here, not as every row failing to connect."""
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"must be an http(s) URL such as {example}")
    parts = urlsplit(v)
    try:
        port = parts.port  # raises for a port out of range or not a number
    except ValueError:
        raise ValueError("its port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"has no host name; give the whole URL, such as {example}")
    if port == 0:
        raise ValueError("its port is not a number from 1 to 65535")


def _header_safe(value: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in value)


# The flavor the built-in simulator plays when endpoint.simulator does not name one. The product passes it
# explicitly when it starts the simulator (so the two never disagree, and nothing below the drivers needs
# the simulator package to know it); tests/simulator checks it matches the simulator's own default.
SIMULATOR_FLAVOR = "openrouter"


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
        if v != "simulator":
            check_http_url(v, "https://openrouter.ai/api/v1, or 'simulator'")
        return v.rstrip("/")

    def simulator_options(self) -> dict[str, Any]:
        """The simulator's options as the product starts it: the flavor always explicit."""
        return {"flavor": SIMULATOR_FLAVOR, **self.simulator}

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
        from ..common import redact

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
            # OpenRouter's current title header, plus the legacy one it still honours (docs/wire.md §1.1).
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
