"""Request checks that real endpoints make before generating, with their wording.

OpenAI rejects with its own 400s; OpenRouter relays an upstream provider's 400 as "Provider
returned error" (``provider_wrap``) unless it refuses routing itself (404 with
``provider.require_parameters``). vLLM and llama.cpp do not enforce OpenAI's strict-schema or
"json" word rules, so those checks are skipped for them. `ask_of` reads what a parsed body asks and
runs these checks, for chat completions and Batch API lines alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .config import SimConfig
from .envelopes import SimError
from .tokens import ImageSizer, prompt_tokens

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_UNSUPPORTED_STRICT = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas")
_MAX_NESTING = 10
_MAX_PROPERTIES = 5000
_MAX_ENUM_VALUES = 1000
_NO_ENDPOINTS = "No endpoints found that can handle the requested parameters."


def _bad(message: str, param: str | None, code: str | None = None, *, wrap: bool = True) -> SimError:
    return SimError(400, message, "invalid_request_error", code, param, provider_wrap=wrap,
                    error_type="invalid_request")


def model_matches(model: str, patterns: list[str] | dict[str, int]) -> str | None:
    low = model.lower()
    return next((p for p in patterns if p.lower() in low), None)


def messages_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(parts)


@dataclass(slots=True)
class Ask:
    """A request that passed auth, parsing and validation."""

    body: dict[str, Any]
    raw_digest: bytes
    model: str
    max_tokens: int | None
    prompt: int
    text: str
    served_model: str  # the model that answers ("" when a model_down fault leaves no fallback)


def ask_of(body: dict[str, Any], digest: bytes, cfg: SimConfig, sizer: ImageSizer) -> Ask | SimError:
    """What a parsed request body asks (model, max_tokens, prompt tokens, the messages' text), or the
    validation error it gets."""
    model = str(body.get("model") or (cfg.default_model if cfg.flavor != "openai" else ""))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        return SimError(400, f"Invalid type for 'max_tokens': expected an integer, but got "
                             f"{type(max_tokens).__name__} instead.", param="max_tokens",
                        oa_code="invalid_type", error_type="invalid_request")
    prompt, _images = prompt_tokens(body, sizer, cfg.upscale_images)
    text = messages_text(body.get("messages") or []) if isinstance(body.get("messages"), list) else ""
    err = validate(body, cfg, model, prompt, max_tokens, text)
    if err is not None:
        return err
    return Ask(body, digest, model, max_tokens, prompt, text, model)


def validate(body: dict[str, Any], cfg: SimConfig, model: str, prompt_tokens: int,
             max_tokens: int | None, text: str) -> SimError | None:
    flavor = cfg.flavor
    messages = body.get("messages")
    if not isinstance(messages, list):
        return _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter", wrap=False)
    if not messages:
        return _bad("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
                    "array instead.", "messages", "empty_array", wrap=False)
    if not model:
        return _bad("you must provide a model parameter", None, wrap=False)
    if max_tokens is not None:
        if max_tokens < 1:
            return _bad(f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got "
                        f"{max_tokens} instead.", "max_tokens", "integer_below_min_value", wrap=False)
        cap_key = model_matches(model, cfg.max_output_tokens)
        if cap_key is not None and max_tokens > cfg.max_output_tokens[cap_key]:
            cap = cfg.max_output_tokens[cap_key]
            return _bad(f"max_tokens is too large: {max_tokens}. This model supports at most {cap} completion "
                        f"tokens, whereas you provided {max_tokens}.", "max_tokens")
    err = _context_length(cfg, prompt_tokens, max_tokens)
    if err is not None:
        return err
    err = _response_format(body, cfg, model, text)
    if err is not None:
        return err
    if flavor in ("openai", "openrouter"):
        return _tools(body)
    return None


def _context_length(cfg: SimConfig, prompt: int, max_tokens: int | None) -> SimError | None:
    limit = cfg.context_tokens
    total = prompt + (max_tokens or 0)
    if total <= limit:
        return None
    if max_tokens:
        oa = (f"This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
              f"({prompt} in the messages, {max_tokens} in the completion). Please reduce the length of the "
              "messages or completion.")
    else:
        oa = (f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
              f"{prompt} tokens. Please reduce the length of the messages.")
    orr = (f"This endpoint's maximum context length is {limit} tokens. However, you requested about {total} tokens "
           f"({prompt} of text input, {max_tokens or 0} in the output). Please reduce the length of either one, "
           "or use the \"middle-out\" transform to compress your prompt automatically.")
    if cfg.flavor == "llamacpp":
        oa = "the request exceeds the available context size, try increasing it"
    return SimError(400, oa, "invalid_request_error", "context_length_exceeded", "messages", or_message=orr,
                    error_type="context_length_exceeded", lcpp_type="exceed_context_size_error",
                    lcpp_extra={"n_prompt_tokens": prompt, "n_ctx": limit})


def _response_format(body: dict[str, Any], cfg: SimConfig, model: str, text: str) -> SimError | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        return _bad("Invalid type for 'response_format': expected an object.", "response_format", "invalid_type")
    kind = fmt.get("type")
    flavor = cfg.flavor
    allowed = ("text", "json_object", "json_schema") + (("grammar", "python") if flavor == "openrouter" else ())
    if kind not in allowed:
        if flavor == "llamacpp":
            return _bad(f'response_format type must be one of "text" or "json_object", but got: {kind}', None)
        return _bad(f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and 'text'.",
                    "response_format.type", "invalid_value")
    if flavor not in ("openai", "openrouter"):
        return None
    if kind == "json_object" and "json" not in text.lower():
        return _bad("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                    "'json_object'.", "messages")
    if kind != "json_schema":
        return None
    if model_matches(model, cfg.no_json_schema_models) is not None:
        provider = body.get("provider")
        if flavor == "openrouter" and isinstance(provider, dict) and provider.get("require_parameters"):
            return SimError(404, _NO_ENDPOINTS, error_type="not_found")
        return _bad("Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                    "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        return _bad("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema",
                    "missing_required_parameter")
    name = spec.get("name")
    if not isinstance(name, str):
        return _bad("Missing required parameter: 'response_format.json_schema.name'.",
                    "response_format.json_schema.name", "missing_required_parameter")
    if not _NAME_RE.match(name):
        return _bad("Invalid 'response_format.json_schema.name': string does not match pattern. Expected a string "
                    "that matches the pattern '^[a-zA-Z0-9_-]+$'.", "response_format.json_schema.name",
                    "invalid_value")
    if spec.get("strict") is True:
        problem = strict_problem(spec.get("schema"), f"Invalid schema for response_format '{name}'")
        if problem is not None:
            return _bad(problem, "response_format", "invalid_json_schema")
    return None


def _tools(body: dict[str, Any]) -> SimError | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        return _bad("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    names: list[str] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return _bad(f"Missing required parameter: 'tools[{i}].function.name'.", f"tools[{i}].function.name",
                        "missing_required_parameter")
        names.append(fn["name"])
        if fn.get("strict") is True:
            problem = strict_problem(fn.get("parameters"), f"Invalid schema for function '{fn['name']}'")
            if problem is not None:
                return _bad(problem, f"tools[{i}].function.parameters", "invalid_function_parameters")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        if wanted not in names:
            return _bad(f"Invalid value for 'tool_choice': 'tool_choice' references unknown function '{wanted}'.",
                        "tool_choice", "invalid_value")
    return None


def strict_problem(schema: Any, label: str) -> str | None:
    """The first violation of OpenAI's strict structured-output rules, as OpenAI words it."""
    if not isinstance(schema, dict):
        return f"{label}: schema must be a JSON Schema of 'type: \"object\"', got 'type: \"None\"'."
    if "anyOf" in schema:
        return f"{label}: In context=(), root schema must not be 'anyOf'; it must be of 'type: \"object\"'."
    if schema.get("type") != "object":
        return f"{label}: schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{schema.get('type')}\"'."
    counts = {"properties": 0, "enum": 0}
    return _walk_strict(schema, (), label, counts, 0)


def _walk_strict(node: Any, ctx: tuple[Any, ...], label: str, counts: dict[str, int], depth: int) -> str | None:
    if not isinstance(node, dict):
        return None
    if depth > _MAX_NESTING:
        return f"{label}: In context={ctx!r}, schema exceeds the maximum nesting depth of {_MAX_NESTING}."
    for keyword in _UNSUPPORTED_STRICT:
        if keyword in node:
            return f"{label}: In context={ctx!r}, '{keyword}' is not permitted."
    kinds = node.get("type")
    is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node
    if is_object:
        if node.get("additionalProperties") is not False:
            return f"{label}: In context={ctx!r}, 'additionalProperties' is required to be supplied and to be false."
        props = node.get("properties") or {}
        required = node.get("required")
        required = required if isinstance(required, list) else []
        for key in props:
            if key not in required:
                return (f"{label}: In context={ctx!r}, 'required' is required to be supplied and to be an array "
                        f"including every key in properties. Missing '{key}'.")
        counts["properties"] += len(props)
        if counts["properties"] > _MAX_PROPERTIES:
            return f"{label}: schema has more than {_MAX_PROPERTIES} object properties in total."
    if isinstance(node.get("enum"), list):
        counts["enum"] += len(node["enum"])
        if counts["enum"] > _MAX_ENUM_VALUES:
            return f"{label}: schema has more than {_MAX_ENUM_VALUES} enum values in total."
    children: list[tuple[tuple[Any, ...], Any, int]] = []
    for key, sub in (node.get("properties") or {}).items():
        children.append((ctx + ("properties", key), sub, depth + 1))
    if isinstance(node.get("items"), dict):
        children.append((ctx + ("items",), node["items"], depth + 1))
    for i, sub in enumerate(node.get("anyOf") or ()):
        children.append((ctx + ("anyOf", i), sub, depth))
    for defs in ("$defs", "definitions"):
        for key, sub in (node.get(defs) or {}).items():
            children.append((ctx + (defs, key), sub, depth))
    for child_ctx, sub, child_depth in children:
        problem = _walk_strict(sub, child_ctx, label, counts, child_depth)
        if problem is not None:
            return problem
    return None
