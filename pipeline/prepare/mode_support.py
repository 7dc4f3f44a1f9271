"""Whether an endpoint supports a structured mode: its "not supported" refusals, and OpenRouter's routing.

StructuredPlan (structured.py) steps down to the next mode only on the documented refusal for the mode it
sent (docs/wire.md §1.5), never on any other 400; this module reads those refusals. On OpenRouter a
schema-carrying parameter is a soft preference unless `provider.require_parameters` is set, so the plan
also needs to know whether requests go there and whether the user set that flag themselves.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from ..config import EndpointConfig, ParamsConfig

NO_ENDPOINTS = "no endpoints found that can handle the requested parameters"
NOT_SUPPORTED = ("not supported", "unsupported", "does not support", "invalid parameter", "must be one of",
                 "not available")
FALLBACK_STATUSES = (400, 404, 422, 501)   # the statuses a "not supported" refusal comes with


def routes_via_openrouter(endpoint: EndpointConfig) -> bool:
    """Whether requests go to OpenRouter (or to the built-in simulator playing it)."""
    if endpoint.base_url == "simulator":
        return bool(endpoint.simulator_options()["flavor"] == "openrouter")
    host = (urlsplit(endpoint.base_url).hostname or "").lower()
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def user_require_parameters(params: ParamsConfig | None) -> bool | None:
    """provider.require_parameters as the user set it (params.provider or params.extra), else None."""
    if params is None:
        return None
    if params.provider is not None and params.provider.require_parameters is not None:
        return params.provider.require_parameters
    extra = params.extra.get("provider")
    value = extra.get("require_parameters") if isinstance(extra, dict) else None
    return bool(value) if value is not None else None


def unsupported(mode: str, text: str, status: int | None, *, generic: bool = True) -> bool:
    """Whether an error text is the documented "this mode is not supported" answer for `mode`."""
    if generic and NO_ENDPOINTS in text:
        # OpenRouter with require_parameters: no endpoint takes what this mode sent (docs/wire.md §1.5).
        return True
    if status == 404:
        return False
    says_no = any(p in text for p in NOT_SUPPORTED)
    if mode == "tool":
        return says_no and ("tool" in text or "function call" in text or "function_call" in text)
    if "must contain the word" in text:
        return False  # json_object's json-word rule: shape() always satisfies it, so this is not about support
    other = "json_object" if mode == "json_schema" else "json_schema"
    if other in text and mode not in text:
        return False
    if mode == "json_schema" and "invalid schema for response_format" in text:
        return True  # strict rejects the schema itself; a non-strict mode can still carry it
    return says_no and ("response_format" in text or mode in text or "structured output" in text)
