"""Rows into request bodies: Jinja templates over columns and image parts (the request itself: request.py).

Templates are compiled once in Jinja's immutable sandbox (config/templates.py) with StrictUndefined, so a
missing column fails the row instead of silently sending an empty prompt, and a value printed by
`{{ ... }}` that is null fails it too ("null in column X"); a null tested in `{% if x %}` is fine.
`Renderer.check_columns(scan.columns)` turns a template variable (or image / messages / from_columns
column) that no input column provides into one ConfigError before anything is sent, instead of a
failure on every row.

The body holds the model, the messages, and exactly the params set in the config (absent ones stay
absent so the provider's defaults apply), `params.extra` at the top level, and per-row values from
`params.from_columns`. Structured-output shaping is added later by `structured`. Nested values taken
from the config (tools, provider, ...) are shared between bodies: build new ones, never mutate them.
With `prompt.messages_column` the column's messages are sent; `prompt.system` is prepended when they
have no system message and `prompt.user`, when also set, is appended as a final user message.
Prompt tokens are counted by `self.tokens` (prepare/tokens.py) once per distinct request, after shaping;
rendering counts a row only when a cheap bound says it might not fit the context window.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
import orjson

from ..config import Config, templates
from ..errors import ConfigError, RowError
from ..models.catalog import context_window, max_output_tokens
from .caching import CacheHints
from .images import ImageEncoder
from .tokens import TokenCounter

_INT_PARAMS = frozenset({"seed", "max_tokens", "max_completion_tokens", "top_logprobs", "n", "top_k"})
_NUM_PARAMS = frozenset({"temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                         "min_p", "top_a"})
# Fixed text after the first row value worth a warning (~100 tokens): it cannot be cached.
LATE_FIXED_CHARS = 400
_OWN_FIELDS = ("extra", "from_columns", "stream", "models", "provider", "logit_bias")


@dataclass(slots=True)
class RenderedRow:
    """One row as a request body, before structured shaping, with its images' tokens (the tile rule)."""

    body: dict[str, Any]
    max_tokens: int | None
    image_tokens: int = 0  # by the tile rule; text tokens are counted on the body as sent
    # Where the part every row shares ends (caching.SharedEnd: message index from the end, characters of
    # its text or None for all of it); None when the first message already holds row content.
    shared: tuple[int, int | None] | None = None


class _NullValue(Exception):
    """Raised from inside a template when `{{ ... }}` would print a null."""


class _NotText(Exception):
    """Raised when `{{ ... }}` would print a list, mapping or bytes: Python's repr is not prompt text."""


def _no_null(value: Any) -> Any:
    if value is None:
        raise _NullValue
    if isinstance(value, (dict, list, tuple, bytes, bytearray)):
        raise _NotText(type(value).__name__)
    return value


class Renderer:
    """Turns input rows into RenderedRows. Construct once per run: templates compile here, not per row.

    `input_dir` is where relative image paths resolve when a row's origin names no file; normally they
    resolve against the folder of the row's own input file. Pass `columns` (or call check_columns) to
    reject templates that use columns the input does not have.
    """

    def __init__(self, cfg: Config, input_dir: str | None = None, columns: Iterable[str] | None = None) -> None:
        self.cfg = cfg
        p = cfg.prompt
        self._env = template_environment()
        self.variables: dict[str, set[str]] = {}
        self._system = self._compile(p.system, "prompt.system")
        self._user = self._compile(p.user, "prompt.user")
        self._globals = dict(self._env.globals)
        self._system_text = self._constant(self._system, "prompt.system")
        self._user_prefix = templates.fixed_prefix(self._env, p.user)[0] if p.user else ""
        self._messages_col = p.messages_column
        self._image_cols = list(p.images)
        self._images = ImageEncoder(p.image_detail, p.image_max_side, p.image_roots)
        self._input_dir = input_dir  # None (a Ray dataset, no input file): only prompt.image_roots may be read
        self._from_columns = list(cfg.params.from_columns.items())
        self._static = self._static_body()
        self._context = context_window(cfg.endpoint.model)
        self.tokens = TokenCounter(cfg.endpoint.model)
        # One prompt_cache_key per job: the job's fingerprint (what shapes its requests).
        self.hints = CacheHints(p.cache, cfg.endpoint.model, cfg.endpoint.base_url, cfg.request_fingerprint())
        self._max_output = max_output_tokens(cfg.endpoint.model)
        if cfg.params.max_tokens is not None and self._max_output and cfg.params.max_tokens > self._max_output:
            raise ConfigError(f"{cfg.params.max_tokens} is more than {cfg.endpoint.model} can produce "
                              f"({self._max_output} tokens); lower it", key="params.max_tokens", file=cfg.source)
        if columns is not None:
            self.check_columns(columns)

    def for_config(self, cfg: Config) -> Renderer:
        """The same rows rendered for another model of the job (a cascade stage, the audit's model)."""
        return Renderer(cfg, input_dir=self._input_dir)

    def _compile(self, source: str | None, key: str) -> jinja2.Template | None:
        if not source:
            return None
        template, self.variables[key] = templates.compile_template(self._env, source, key, self.cfg.source)
        return template

    def _constant(self, template: jinja2.Template | None, key: str) -> str | None:
        """The text of a template that uses no column, rendered once (a fixed system prompt, typically)."""
        if template is None or self.variables[key]:
            return None
        try:
            return _render(template, {}, self._globals)
        except Exception:  # noqa: BLE001 - rendered per row instead, where the failure becomes a RowError
            return None

    def _static_body(self) -> dict[str, Any]:
        params, src = self.cfg.params, self.cfg.source
        body: dict[str, Any] = params.model_dump(exclude_none=True, exclude=set(_OWN_FIELDS))
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}  # JSON keys are strings
        if params.models:
            body["models"] = list(params.models)
        if params.provider is not None and (provider := params.provider.model_dump(exclude_none=True)):
            body["provider"] = provider
        if params.stream:
            body["stream"] = True
            # Usage arrives in a final chunk only when asked for (OpenAI; OpenRouter ignores it, harmless).
            body["stream_options"] = {"include_usage": True}
        for key, value in params.extra.items():
            if key == "stream_options" and isinstance(value, dict) and params.stream:
                body["stream_options"] = {**body["stream_options"], **value}  # e.g. include_obfuscation
                continue
            if key in ("model", "messages", "stream"):
                hint = {"model": "endpoint.model", "messages": "prompt", "stream": "params.stream"}[key]
                raise ConfigError(f"set {key} with {hint}, not in params.extra", key=f"params.extra.{key}", file=src)
            if key in body:
                raise ConfigError(f"{key} is already set by params.{key}; set it once", key=f"params.extra.{key}",
                                  file=src)
            body[key] = value
        for field in params.from_columns:
            if field == "messages":
                raise ConfigError("messages cannot come from params.from_columns; use prompt.messages_column",
                                  key="params.from_columns.messages", file=src)
        # What quality.confidence needs measured (logprobs, or n samples at the vote temperature).
        body.update(self.cfg.quality.body_fields(body, self.cfg.endpoint.base_url))
        body["model"] = self.cfg.endpoint.model
        return body

    def check_columns(self, columns: Iterable[str]) -> None:
        """ConfigError naming the key when the config uses a column the input does not have."""
        have = set(columns)
        available = ", ".join(sorted(have)) or "(none)"
        uses: list[tuple[str, set[str]]] = list(self.variables.items())
        uses += [("prompt.images", set(self._image_cols))]
        uses += [("prompt.messages_column", {self._messages_col} if self._messages_col else set())]
        uses += [(f"params.from_columns.{f}", {c}) for f, c in self._from_columns]
        for key, names in uses:
            missing = sorted(names - have)
            if missing:
                raise ConfigError(f"uses {', '.join(map(repr, missing))}, not among the input columns: {available}",
                                  key=key, file=self.cfg.source)

    def render(self, row: dict[str, Any], origin: tuple[str, int]) -> RenderedRow:
        """The request body for one row; RowError naming file+row when the row cannot become one."""
        messages: list[dict[str, Any]] = []
        system = self._system_text
        if system is None and self._system is not None:
            system = self._text(self._system, "prompt.system", row, origin)
        user = self._text(self._user, "prompt.user", row, origin) if self._user else None
        if self._messages_col:
            messages = self._column_messages(row, origin)
            if system is not None and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system})
            if user is not None:
                messages.append({"role": "user", "content": user})
        else:
            if system is not None:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": user})
        image_tokens = self._add_images(messages, row, origin) if self._image_cols else 0
        shared = self._shared_end(messages, user)
        body = dict(self._static)
        body["messages"] = messages
        for field, column in self._from_columns:
            value = row.get(column)
            if value is not None:
                body[field] = _param(field, value, column, origin)
                if field == "max_tokens" and self._max_output and body[field] > self._max_output:
                    raise RowError(f"column {column!r} gives max_tokens={body[field]}, more than {body['model']} can "
                                   f"produce ({self._max_output})", file=origin[0], row=origin[1], reason="param")
        if self.tokens.upper_bound(body, image_tokens) > self._context and \
                (est := self.tokens.count(body, image_tokens)) > self._context:
            raise RowError(f"the prompt is about {est:,} tokens, over the {self._context:,}-token context window of "
                           f"{body['model']}; shorten this row's text or images", file=origin[0], row=origin[1],
                           reason="context")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if self.hints.style is not None:
            body = self.hints.apply(body, shared)
        return RenderedRow(body, max_tokens if type(max_tokens) is int else None, image_tokens, shared)

    def _shared_end(self, messages: list[dict[str, Any]], user: str | None) -> tuple[int, int | None] | None:
        """Where the text every row shares ends: the fixed start of the user template when everything
        before it is fixed too, else a fixed system prompt of ours, else nowhere."""
        has_system = self._system is not None
        if has_system and self._system_text is None:
            return None  # the system prompt holds row values: nothing after its start is shared
        if not self._messages_col and self._user_prefix and user is not None and user.startswith(self._user_prefix):
            return -1, len(self._user_prefix)  # the user message is the last one
        if has_system and messages and messages[0]["role"] == "system" and messages[0]["content"] == self._system_text:
            return -len(messages), None
        return None

    def cache_notes(self) -> list[str]:
        """What in the templates keeps shared text from being cached (row content before it)."""
        notes = []
        for key, template in (("prompt.system", self.cfg.prompt.system), ("prompt.user", self.cfg.prompt.user)):
            if not template or not self.variables.get(key):
                continue
            prefix, after = templates.fixed_prefix(self._env, template)
            if after >= LATE_FIXED_CHARS:
                notes.append(f"{key} puts row content before {after:,} characters of fixed text: put the fixed "
                             "text (instructions, examples) first and the row's values last, so providers can "
                             "cache it")
        if self.cfg.prompt.system and self.variables.get("prompt.system") and self.cfg.prompt.user:
            notes.append("prompt.system uses row values, so the user template's fixed text is not shared either; "
                         "keep row values out of the system prompt")
        return notes

    def _text(self, template: jinja2.Template, key: str, row: dict[str, Any], origin: tuple[str, int]) -> str:
        try:
            return _render(template, row, self._globals)
        except _NullValue:
            nulls = self._printed_nulls(template, key, row)
            what = f"null in column {', '.join(map(repr, nulls))}" if nulls else "a null value"
            msg, reason = f"{key}: {what} (use {{{{ x or '' }}}} or an {{% if %}} to allow it)", "null_value"
        except _NotText as exc:
            msg = (f"{key}: a value printed by {{{{ ... }}}} is a {exc}, not text; format it in the template, "
                   f"e.g. {{{{ x | join(', ') }}}} or {{{{ x | tojson }}}}")
            reason = "template"
        except jinja2.UndefinedError as exc:
            cols = ", ".join(list(row)[:20]) or "(none)"
            msg, reason = f"{key}: {exc.message}; this row's columns: {cols}", "missing_column"
        except Exception as exc:  # noqa: BLE001 - a filter or expression failed on this row's values
            msg, reason = f"{key}: rendering failed: {type(exc).__name__}: {exc}", "template"
        raise RowError(msg, file=origin[0], row=origin[1], reason=reason)

    def _printed_nulls(self, template: jinja2.Template, key: str, row: dict[str, Any]) -> list[str]:
        """Which null columns the template prints (vs. only tests); the error path only, so re-rendering is fine."""
        nulls = sorted(v for v in self.variables[key] if v in row and row[v] is None)
        printed = []
        for name in nulls:
            try:
                _render(template, {**row, **{v: "" for v in nulls if v != name}}, self._globals)
            except _NullValue:
                printed.append(name)
            except Exception:  # noqa: BLE001, S110 - another problem, not this column's null
                pass
        return printed or nulls

    def _column_messages(self, row: dict[str, Any], origin: tuple[str, int]) -> list[dict[str, Any]]:
        col = self._messages_col
        value = row.get(col)  # type: ignore[arg-type]
        if isinstance(value, (str, bytes)):
            try:
                value = orjson.loads(value)  # a JSON-encoded list, as CSV-born Parquet often has
            except orjson.JSONDecodeError:
                pass
        shape = "a non-empty list of {role, content} messages"
        if not isinstance(value, list) or not value:
            raise RowError(f"column {col!r} must hold {shape}, got {type(value).__name__}", file=origin[0],
                           row=origin[1], reason="messages")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(value):
            ok = isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
            content = m.get("content") if ok else None
            if not ok or not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
                raise RowError(f"column {col!r} message {i} is not a {{role, content}} object with text or "
                               f"content parts; the column must hold {shape}", file=origin[0], row=origin[1],
                               reason="messages")
            # Parquet structs give every field to every message; nulls would be sent as explicit nulls.
            out.append({k: v for k, v in m.items() if v is not None})
        return out

    def _add_images(self, messages: list[dict[str, Any]], row: dict[str, Any], origin: tuple[str, int]) -> int:
        base = os.path.dirname(origin[0]) or self._input_dir  # "<ray dataset>" names no folder
        parts: list[dict[str, Any]] = []
        tokens = 0
        for col in self._image_cols:
            got, n = self._images.parts(row.get(col), base_dir=base, origin=origin, column=col)
            parts += got
            tokens += n
        if not parts:
            return 0
        target = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if target is None:
            messages.append({"role": "user", "content": parts})
            return tokens
        text = target["content"]
        if isinstance(text, list):
            target["content"] = [*text, *parts]
        else:
            # Text first, then the images (docs/wire.md §1.3); an empty text part is left out.
            target["content"] = ([{"type": "text", "text": text}] if text else []) + parts
        return tokens


def template_environment() -> jinja2.Environment:
    """The one Jinja environment prompts compile in: the immutable sandbox (config/templates.py); undefined
    columns and printed nulls fail the row."""
    return templates.environment(finalize=_no_null)


def _render(template: jinja2.Template, row: dict[str, Any], env_globals: dict[str, Any]) -> str:
    # Template.render() rebuilds its context from a ChainMap of globals on every call, which is half the
    # cost of a short template; one dict merge does the same job. Errors surface unwrapped.
    ctx = template.new_context({**env_globals, **row}, shared=True)
    return "".join(template.root_render_func(ctx))


def _param(field: str, value: Any, column: str, origin: tuple[str, int]) -> Any:
    """A per-row body value, checked for the fields whose type is known."""
    if field in _INT_PARAMS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not int:
            raise RowError(f"column {column!r} gives {field}={value!r:.40}; it must be an integer",
                           file=origin[0], row=origin[1], reason="param")
    elif field in _NUM_PARAMS and (type(value) is bool or not isinstance(value, (int, float))):
        raise RowError(f"column {column!r} gives {field}={value!r:.40}; it must be a number",
                       file=origin[0], row=origin[1], reason="param")
    return value


