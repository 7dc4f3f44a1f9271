"""Structured outputs: get schema-valid JSON from any OpenAI-compatible model.

Four modes ask for the same thing in different ways:

    json_schema   response_format {"type": "json_schema", ...}: constrained decoding (gpt-4o+, vLLM, llama.cpp)
    tool          one forced function call whose parameters are the schema (gpt-4-turbo, most chat models)
    json_object   JSON mode plus the schema in the system prompt (syntax guaranteed, schema by instruction)
    auto          the best mode the capability table knows for the model, stepping down to the next one
                  when the endpoint answers with its documented "not supported" error (docs/wire.md §1.5),
                  once per mode and recorded, so the user never has to know which is which.

Whatever the mode, answers are validated on our side against the user's schema: a provider may treat
the schema as a hint, and JSON mode never enforces it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..config import Config, EndpointConfig, ParamsConfig, StructuredConfig
from ..errors import BadContentError, ConfigError
from ..models.catalog import capabilities
from .mode_support import FALLBACK_STATUSES, NO_ENDPOINTS, routes_via_openrouter, unsupported, user_require_parameters
from .schema import SCHEMA_KEY, check_schema, pointer, strict_normalise, tolerant_schema

MODES = ("json_schema", "tool", "json_object")
# Modes whose schema travels only in a request parameter (response_format, tools). On OpenRouter such a
# parameter is a soft preference: with no supporting provider the request goes to one that ignores it,
# and the model answers prose that fails as bad content on every row, paid for each time.
# provider.require_parameters turns that into a free 404, which auto mode reads as "not supported".
# json_object is left alone: its schema is also in the prompt, so an ignored response_format still
# gets JSON, and as the last resort it must not be blocked by some other parameter a provider lacks.
GUARDED_MODES = ("json_schema", "tool")

INSTRUCTION = "Respond with a single JSON object that conforms to this JSON Schema:\n{schema}\n" \
              "Reply with the JSON object only, without code fences or any other text."
TOOL_DESCRIPTION = "Record the answer. Call this function exactly once; its arguments are the answer."
ERROR_CHARS = 300

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)\r?\n?[ \t]*```", re.DOTALL)


class StructuredPlan:
    """How requests ask for structured output and how answers are turned back into data.

    One plan serves a whole run. It is used from one event loop and never awaits, so mode switches are
    atomic with respect to the requests in flight.
    """

    def __init__(self, cfg: StructuredConfig, model: str, *, schema: dict[str, Any] | None = None,
                 endpoint: EndpointConfig | None = None, params: ParamsConfig | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.schema: dict[str, Any] = schema if schema is not None else _load(cfg.schema_)
        check_schema(self.schema)
        self.notes: list[str] = []
        self.fallbacks: list[dict[str, Any]] = []
        known = capabilities(model, {glob: list(modes) for glob, modes in cfg.capabilities.items()})
        if cfg.mode == "auto":
            self.modes: list[str] = known
        else:
            self.modes = [cfg.mode]
            if cfg.mode not in known:
                self.notes.append(f"structured.mode is {cfg.mode} but {model} is not known to support it "
                                  f"(known: {', '.join(known)}); expect HTTP 400/404, or use mode: auto")
        self._abandoned: set[str] = set()
        self._mode = self.modes[0]
        # Set only where the user left it unset: an explicit false (or true) is theirs to keep.
        self.require_parameters = (endpoint is not None and routes_via_openrouter(endpoint)
                                   and user_require_parameters(params) is None)
        if self.require_parameters and any(m in GUARDED_MODES for m in self.modes):
            self.notes.append("provider.require_parameters: true is sent with json_schema and tool requests, so "
                              "OpenRouter answers 404 instead of routing to a provider that would ignore the "
                              "schema; set params.provider.require_parameters: false to route anyway")
        self.sent_schema: dict[str, Any] = self.schema
        if self.cfg.strict and "json_schema" in self.modes:
            # Strict mode rejects schemas that leave properties optional or objects open; send what it
            # accepts and tell the user what changed.
            self.sent_schema, notes = strict_normalise(self.schema)
            self.notes.extend(f"strict: {n}" for n in notes)
        self._instruction = INSTRUCTION.format(schema=orjson.dumps(self.schema).decode())
        # Compiled once: validation runs for every answer. Optional properties also accept null, so a
        # strict-mode "absent" (null) passes and lands as a null column value.
        tolerant = tolerant_schema(self.schema)
        self._validator = Draft202012Validator(tolerant)  # for the error message, when an answer is bad
        # The hot path: the Rust validator answers "valid?" ~100x faster (a quarter of our CPU per request).
        self._is_valid = jsonschema_rs.validator_for(tolerant).is_valid

    def prefer_logprobs(self) -> None:
        """quality.confidence: logprobs reads the answer's token probabilities, which cover message content
        (json_schema, json_object) but not tool-call arguments: auto mode leaves tool mode out."""
        if "tool" not in self.modes:
            return
        rest = [m for m in self.modes if m != "tool"]
        if not rest:
            self.notes.append(f"{self.model} answers only in tool mode, whose arguments carry no logprobs: "
                              "confidence stays null (use quality.confidence: votes)")
            return
        self.modes = rest
        if self._mode == "tool":
            self._mode = rest[0]
        self.notes.append("quality.confidence: logprobs: tool mode left out (tool-call arguments carry no "
                          f"logprobs); modes {', '.join(rest)}")

    @property
    def mode(self) -> str:
        """The mode requests are shaped for now."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        # Restoring a mode an earlier run learned: the modes before it were abandoned then, so a later
        # fallback must step forward from here, never back to them.
        if value not in MODES:
            raise ValueError(f"unknown structured mode {value!r}; expected one of {', '.join(MODES)}")
        if value in self.modes:
            skipped = [m for m in self.modes[: self.modes.index(value)] if m not in self._abandoned]
            self._abandoned.update(skipped)
            if skipped:
                self.notes.append(f"starting in {value}: an earlier run of this job found "
                                  f"{', '.join(skipped)} not supported by {self.model}")
        self._mode = value

    # -- requests ------------------------------------------------------------------------------------

    def shape(self, body: dict[str, Any]) -> dict[str, Any]:
        """A new body asking for structured output in the current mode; the input is not touched.

        Whatever an earlier shape() added is removed first, so re-shaping after a fallback or shaping
        twice never duplicates anything. The plan owns response_format, in tool mode tool_choice, and on
        OpenRouter provider.require_parameters unless the user set it.
        """
        out = dict(body)
        self._unshape(out)
        if self.mode == "json_schema":
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": self.cfg.name, "schema": self.sent_schema, "strict": self.cfg.strict},
            }
        elif self.mode == "json_object":
            out["response_format"] = {"type": "json_object"}
            out["messages"] = self._instruct(list(out.get("messages") or []))
        else:
            fn = {"name": self.cfg.name, "description": self.schema.get("description") or TOOL_DESCRIPTION,
                  "parameters": self.schema}
            out["tools"] = [*(out.get("tools") or []), {"type": "function", "function": fn}]
            out["tool_choice"] = {"type": "function", "function": {"name": self.cfg.name}}
        if self.require_parameters and self.mode in GUARDED_MODES:
            # A new dict: the provider preferences are shared by every body built from the config.
            out["provider"] = {**(out.get("provider") or {}), "require_parameters": True}
        return out

    def mode_of(self, body: dict[str, Any]) -> str | None:
        """Which mode a shaped body was shaped for (pass it to fallback() for in-flight requests)."""
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
            return str(fmt["type"])
        return "tool" if self._is_ours(body.get("tool_choice")) else None

    def _is_ours(self, item: Any) -> bool:
        return isinstance(item, dict) and (item.get("function") or {}).get("name") == self.cfg.name

    def _unshape(self, out: dict[str, Any]) -> None:
        out.pop("response_format", None)
        if self.require_parameters and isinstance(out.get("provider"), dict):
            # Ours to remove: the guard is only on when the user did not set require_parameters.
            out["provider"] = {k: v for k, v in out["provider"].items() if k != "require_parameters"}
            if not out["provider"]:
                del out["provider"]
        if self._is_ours(out.get("tool_choice")):
            del out["tool_choice"]
        if out.get("tools"):
            tools = [t for t in out["tools"] if not self._is_ours(t)]
            if tools:
                out["tools"] = tools
            else:
                del out["tools"]
        if out.get("messages"):
            out["messages"] = self._uninstruct(out["messages"])

    def _instruct(self, messages: list[Any]) -> list[Any]:
        for i, msg in enumerate(messages):
            if isinstance(msg, dict) and msg.get("role") in ("system", "developer"):
                content = msg.get("content")
                if isinstance(content, list):
                    content = [*content, {"type": "text", "text": self._instruction}]
                else:
                    content = f"{content}\n\n{self._instruction}" if content else self._instruction
                messages[i] = {**msg, "content": content}
                return messages
        return [{"role": "system", "content": self._instruction}, *messages]

    def _uninstruct(self, messages: list[Any]) -> list[Any]:
        instr, suffix, part = self._instruction, "\n\n" + self._instruction, {"type": "text", "text": self._instruction}
        out: list[Any] = []
        for msg in messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            if content == instr:
                if msg.get("role") == "system":
                    continue  # inserted by _instruct
                msg = {**msg, "content": ""}
            elif isinstance(content, str) and content.endswith(suffix):
                msg = {**msg, "content": content[: -len(suffix)]}
            elif isinstance(content, list) and part in content:
                msg = {**msg, "content": [p for p in content if p != part]}
            out.append(msg)
        return out

    # -- fallback ------------------------------------------------------------------------------------

    def fallback(self, status: int | None, message: str, code: str | None = None, *,
                 mode: str | None = None) -> bool:
        """Step down to the next supported mode if this error says the current one is unsupported.

        True means: re-shape the request with shape() and send it again; it does not count as a
        failure. `message` should include OpenRouter's error.metadata.raw when present. `mode` is the
        mode the failed request was shaped for (see mode_of); it tells a late answer to a request sent
        before a switch from a new refusal, so requests in flight do not cause a second step down.
        """
        if self.cfg.mode != "auto" or (status is not None and status not in FALLBACK_STATUSES):
            return False
        text = f"{message} {code or ''}".lower()
        sent = mode or self.mode
        if sent != self.mode:
            return sent in self._abandoned and unsupported(sent, text, status)
        if not unsupported(sent, text, status):
            # Without `mode`, a late answer that names an abandoned mode is still recognisable.
            return mode is None and any(unsupported(m, text, status, generic=False) for m in self._abandoned)
        self._abandoned.add(sent)
        nxt = next((m for m in self.modes if m not in self._abandoned), None)
        if nxt is None:
            return False
        self._mode = nxt
        short = _clip(message.strip(), 200)
        self.fallbacks.append({"from": sent, "to": nxt, "status": status, "message": short})
        why = (" (with the provider.require_parameters the pipeline sets, any parameter the providers lack gives "
               "this 404, not only the structured one)") if self.require_parameters and NO_ENDPOINTS in text else ""
        self.notes.append(f"{sent} not supported by {self.model} (HTTP {status}: {short}){why}; "
                          f"falling back to {nxt} for the rest of the run")
        return True

    # -- answers -------------------------------------------------------------------------------------

    def extract(self, message: dict[str, Any], finish_reason: str | None) -> tuple[Any, str]:
        """(parsed output, raw text) from one choice's message, or BadContentError with the raw text."""
        refusal = message.get("refusal")
        if refusal:
            raise BadContentError(f"the model refused: {_clip(str(refusal), ERROR_CHARS)}", reason="refusal",
                                  content=str(refusal))
        raw = self._tool_arguments(message)
        if raw is not None:
            text = _unfence(raw)
        else:
            # Also read content outside tool mode's own answers: a request shaped before a fallback
            # may answer after it, and some servers put a forced call's JSON in content.
            raw = _content_text(message.get("content"))
            text = _unfence(raw)
            # Prose, or a call to another tool; nothing at all is "empty", cut off mid-call is "length".
            other_call = bool(message.get("tool_calls")) and finish_reason != "length"
            if self.mode == "tool" and not text.startswith("{") and (text or other_call):
                raise BadContentError(f"no call to the {self.cfg.name} tool and the content is not JSON: "
                                      f"{_clip(text, 200)!r}", reason="no_tool_call", content=raw)
        if finish_reason == "length":
            # Checked before "empty": a reasoning model cut off mid-thought answers with nothing, and
            # the remedy (more max_tokens) is the length one.
            raise BadContentError("the answer was cut off at max_tokens (finish_reason: length)",
                                  reason="length", content=raw)
        if not text:
            others = message.get("tool_calls") or []
            if others and self.mode != "tool":
                # With the user's own params.tools the model may call one instead of answering; keep the
                # calls as the raw content so the failure row shows what it did.
                names = ", ".join(str((c.get("function") or {}).get("name")) for c in others if isinstance(c, dict))
                raise BadContentError(f"the model called {names} instead of answering with the JSON object",
                                      reason="tool_call", content=orjson.dumps(others).decode())
            raise BadContentError("the answer is empty", reason="empty", content=raw)
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BadContentError(f"the answer is not JSON ({exc}): {_clip(text, 120)!r}"[:ERROR_CHARS],
                                  reason="not_json", content=raw) from None
        why = self.problem(value)
        if why is not None:
            raise BadContentError(_clip(f"the answer {why}", ERROR_CHARS), reason="schema", content=raw)
        return value, raw

    def problem(self, value: Any) -> str | None:
        """Why `value` does not match the schema ("does not match the schema at /x: ..."), None if it does."""
        if self._is_valid(value):
            return None
        err = best_match(self._validator.iter_errors(value))
        where = pointer(err.absolute_path) if err is not None else "(root)"
        why = err.message if err is not None else "invalid"
        return f"does not match the schema at {where}: {why}"

    def _tool_arguments(self, message: dict[str, Any]) -> str | None:
        calls = message.get("tool_calls") or []
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            calls = [*calls, {"function": legacy}]
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and fn.get("name") == self.cfg.name:
                args = fn.get("arguments")
                if isinstance(args, (dict, list)):  # some servers send arguments already decoded
                    return orjson.dumps(args).decode()
                return args if isinstance(args, str) else ""
        return None


# ---------------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts, as some OpenAI-compatible servers answer
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _unfence(text: str) -> str:
    text = text.strip()
    if "```" not in text:
        return text
    found = _FENCE.search(text)
    return found.group(1).strip() if found else text.strip("`").strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load(source: dict[str, Any] | str | None) -> dict[str, Any]:
    if source is None:
        raise ConfigError("no schema given: set structured.schema to a JSON Schema or a .json file",
                          key=SCHEMA_KEY)
    if isinstance(source, dict):
        return source
    try:
        loaded = orjson.loads(Path(source).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read schema file {source}: {exc}", key=SCHEMA_KEY) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"schema file {source} must hold a JSON object", key=SCHEMA_KEY)
    return loaded


def plan_for(cfg: Config, schema: dict[str, Any] | None = None) -> StructuredPlan | None:
    """The job's plan, or None without a `structured` section; schema errors name the config file."""
    if cfg.structured is None:
        return None
    try:
        plan = StructuredPlan(cfg.structured, cfg.endpoint.model, schema=schema, endpoint=cfg.endpoint,
                              params=cfg.params)
    except ConfigError as exc:
        raise exc.located(cfg.source) from None
    if cfg.quality.confidence == "logprobs":
        plan.prefer_logprobs()
    plan.notes.extend(cfg.quality.notes())
    return plan
