"""Error bodies as each provider shapes them, from one flavor-neutral description (SimError).

- openrouter: ``{"error":{"code":int,"message","metadata"?},"user_id"}``; upstream failures are relayed
  as "Provider returned error" with the upstream body as a string in ``metadata.raw``; the
  availability variant has no ``error.code`` but ``error_type``/``http_status``/``availability``.
- openai: ``{"error":{"message","type","param","code":str|null}}``.
- vllm: ``{"error":{"message","type","param":null,"code":int}}``; 401 is ``{"error":"Unauthorized"}``;
  older versions (``legacy``) answered with the flat ``{"object":"error","message","type","param","code"}``.
- llamacpp: ``{"error":{"code":int,"message","type"}}``.
"""

from __future__ import annotations

import http
from dataclasses import dataclass, field
from typing import Any

import orjson

from .limits import seconds_text

USER_ID = "user_sim_0001"

_VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError",
               500: "InternalServerError", 501: "NotImplementedError"}
_LCPP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 501: "not_supported_error", 503: "unavailable_error",
               429: "unavailable_error"}


@dataclass(slots=True)
class SimError:
    """A provider-neutral error; ``render`` turns it into the flavor's status, body and headers."""

    status: int
    message: str  # OpenAI-side wording (also used by vllm/llamacpp)
    oa_type: str = "invalid_request_error"
    oa_code: str | None = None
    param: str | None = None
    or_message: str | None = None  # OpenRouter's own wording when it differs
    error_type: str | None = None  # OpenRouter metadata.error_type
    metadata: dict[str, Any] = field(default_factory=dict)  # extra OpenRouter metadata
    provider_wrap: bool = False  # OpenRouter relays an upstream (OpenAI) error body
    availability: dict[str, Any] | None = None  # OpenRouter availability variant (no error.code)
    lcpp_type: str | None = None
    lcpp_extra: dict[str, Any] = field(default_factory=dict)
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


def openai_error_body(err: SimError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.oa_type, "param": err.param, "code": err.oa_code}}


def error_object(err: SimError, flavor: str, provider: str) -> Any:
    """The value of the top-level ``error`` key (also used inside 200 bodies and SSE chunks)."""
    if flavor == "openrouter":
        if err.availability is not None:
            return {"message": err.or_message or err.message, "error_type": err.error_type,
                    "http_status": err.status, "availability": err.availability}
        if err.provider_wrap:
            meta: dict[str, Any] = {"raw": orjson.dumps(openai_error_body(err)).decode(),
                                    "provider_name": provider, "is_byok": False}
            if err.error_type:
                meta["error_type"] = err.error_type
            meta.update(err.metadata)
            return {"code": err.status, "message": "Provider returned error", "metadata": meta}
        out: dict[str, Any] = {"code": err.status, "message": err.or_message or err.message}
        meta = dict(err.metadata)
        if err.error_type:
            meta.setdefault("error_type", err.error_type)
        if meta:
            out["metadata"] = meta
        return out
    if flavor == "openai":
        return openai_error_body(err)["error"]
    if flavor == "vllm":
        if err.status == 401:
            return "Unauthorized"
        kind = _VLLM_TYPES.get(err.status) or _phrase(err.status)
        return {"message": err.message, "type": kind, "param": err.param, "code": err.status}
    kind = err.lcpp_type or _LCPP_TYPES.get(err.status) or (
        "server_error" if err.status >= 500 else "invalid_request_error")
    return {"code": err.status, "message": err.message, "type": kind, **err.lcpp_extra}


def render(err: SimError, flavor: str, provider: str, *, legacy: bool = False) -> tuple[int, bytes, dict[str, str]]:
    obj = error_object(err, flavor, provider)
    if legacy and flavor == "vllm" and isinstance(obj, dict):
        body: dict[str, Any] = {"object": "error", **obj}
    else:
        body = {"error": obj}
    if flavor == "openrouter":
        body["user_id"] = USER_ID
    headers = dict(err.headers)
    if err.retry_after is not None:
        headers["Retry-After"] = seconds_text(err.retry_after)
        if flavor == "openai":
            headers["retry-after-ms"] = str(round(err.retry_after * 1000))
    return err.status, orjson.dumps(body), headers


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# -- the catalogue of errors, by status, for scripted and random faults --------------------------

# status -> (OpenAI message, OpenAI type, OpenAI code, OpenRouter message, OpenRouter error_type)
_GENERIC: dict[int, tuple[str, str, str | None, str, str]] = {
    400: ("Invalid request.", "invalid_request_error", None, "Invalid request", "invalid_request"),
    401: ("Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
          "invalid_request_error", "invalid_api_key", "User not found.", "authentication"),
    402: ("Insufficient credits.", "insufficient_quota", "insufficient_quota",
          "Insufficient credits. Add more using https://openrouter.ai/settings/credits", "payment_required"),
    403: ("Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory",
          "Forbidden", "permission_denied"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found",
          "No endpoints found that can handle the requested parameters.", "not_found"),
    408: ("Request timed out.", "timeout", None, "Request timed out", "timeout"),
    413: ("Request entity too large.", "invalid_request_error", None, "Payload too large", "payload_too_large"),
    422: ("Unprocessable entity.", "invalid_request_error", None, "Unprocessable entity", "unprocessable"),
    429: ("Rate limit reached. Please try again in 1s.", "requests", "rate_limit_exceeded",
          "Rate limit exceeded", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None,
          "Internal Server Error", "server"),
    502: ("Bad gateway.", "server_error", None, "Provider returned error", "provider_unavailable"),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None,
          "The model is overloaded. Please try again later.", "provider_overloaded"),
    504: ("Gateway timeout.", "server_error", None, "Upstream request timed out", "timeout"),
    524: ("Request timed out.", "server_error", None, "Request timed out. Please try again later.", "timeout"),
    529: ("The engine is currently overloaded, please try again later.", "server_error", None,
          "Provider overloaded", "provider_overloaded"),
}


def generic_error(status: int, message: str | None = None) -> SimError:
    oa_msg, oa_type, oa_code, or_msg, error_type = _GENERIC.get(status) or (
        f"HTTP {status}", "server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status}",
        "unmapped")
    return SimError(status, message or oa_msg, oa_type, oa_code, or_message=message or or_msg,
                    error_type=error_type, provider_wrap=(status == 502 and message is None))


# Mid-stream error codes as strings, for the variant OpenRouter's streaming docs show.
_STRING_CODES = {429: "rate_limit_exceeded", 504: "timeout", 524: "timeout", 408: "timeout", 402: "payment_required"}


def string_code(status: int) -> str:
    return _STRING_CODES.get(status, "server_error" if status >= 500 else "invalid_request")


def flagged_input(text: str) -> str:
    """OpenRouter's moderation excerpt: at most 100 characters, cut in the middle with '...'."""
    return text if len(text) <= 100 else text[:48] + "..." + text[-49:]
