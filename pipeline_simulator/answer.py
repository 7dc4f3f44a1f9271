"""The simulated model's answer to one request: content or tool call, finish reason, usage.

All randomness comes from the request digest (hash of seed + canonical body), so an identical
request always gets the identical answer, whichever arrival it is.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import orjson

from .content import SchemaFinder, break_schema, fake_json, plain_text, small_json
from .tokens import text_tokens

REFUSAL_TEXT = "I'm sorry, I can't help with that."
_EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class Answer:
    content: str | None
    refusal: str | None
    tool_name: str | None
    tool_id: str | None
    tool_args: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    rng_seed: int  # drives stream chunk sizes, so streams are as deterministic as bodies
    cache_write_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None  # choices[0].logprobs.content when asked (quality.py)
    more: list[Answer] | None = None  # choices 1.. when the request asks for n > 1 samples

    @property
    def output(self) -> str:
        """The text a client would accumulate (content, refusal or tool arguments)."""
        if self.tool_name is not None:
            return self.tool_args or ""
        return self.content or self.refusal or ""


@dataclass(slots=True)
class Target:
    """What the request asks the model to produce."""

    kind: str  # "text" | "json" | "tool"
    schema: dict[str, Any] | None = None
    tool_name: str | None = None


def find_target(body: dict[str, Any], flavor: str, finder: SchemaFinder) -> Target:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if isinstance(tools, list) and tools and choice != "none":
        functions: list[dict[str, Any]] = [t["function"] for t in tools
                                           if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        wanted = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        fn = next((f for f in functions if f.get("name") == wanted), functions[0] if functions else None)
        if fn is not None:
            params = fn.get("parameters")
            return Target("tool", params if isinstance(params, dict) else _EMPTY_OBJECT_SCHEMA, str(fn.get("name")))
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return Target("json", schema if isinstance(schema, dict) else None)
        if kind == "json_object":
            schema = fmt.get("schema") if flavor == "llamacpp" else None  # llama.cpp's own extension
            if not isinstance(schema, dict):
                schema = finder.find(body.get("messages") or [])
            return Target("json", schema)
    structured = body.get("structured_outputs")  # vLLM's extra parameter
    if flavor == "vllm" and isinstance(structured, dict) and isinstance(structured.get("json"), dict):
        return Target("json", structured["json"])
    if flavor == "llamacpp" and isinstance(body.get("json_schema"), dict):
        return Target("json", body["json_schema"])
    return Target("text")


def make_answer(target: Target, digest: bytes, prompt_tokens: int, max_tokens: int | None,
                fault: str | None, cached_ratio: float, *, label: bytes | None = None, value: Any = None) -> Answer:
    """`label` seeds what the answer says (packs.label_digest: a row's label is the same alone or packed);
    `value`, when given, is the answer already drawn (a packed request's, packs.pack_value)."""
    seed = int.from_bytes(digest[:8], "big")
    rng = random.Random(int.from_bytes((label or digest)[:8], "big"))
    if target.kind == "text":
        output = plain_text(rng)
    else:
        if value is None:
            value = fake_json(target.schema, rng) if target.schema else small_json(rng)
        if fault == "schema_invalid":
            value = break_schema(value, target.schema or {"type": "object", "required": ["answer"]})
        output = orjson.dumps(value).decode()
    finish = "tool_calls" if target.kind == "tool" else "stop"
    content: str | None = output
    refusal: str | None = None
    tool_name = target.tool_name if target.kind == "tool" else None
    if fault == "refusal":
        content, refusal, tool_name, finish = None, REFUSAL_TEXT, None, "stop"
    elif fault == "empty":
        content, tool_name, finish = "", None, "stop"
    elif fault == "length":
        # Cut mid-object so the JSON cannot parse, as a real max_tokens stop does.
        output = output[: max(1, min(len(output) - 1, len(output) // 2))]
        content, finish = output, "length"
    if max_tokens is not None and content is not None and text_tokens(content) > max_tokens:
        content = content[: max_tokens * 4]
        finish = "length"
    text = refusal if refusal is not None else (content or "")
    completion = text_tokens(text) if text else 0
    tool_args: str | None = None
    tool_id: str | None = None
    if tool_name is not None:
        tool_args, content = content or "", None
        tool_id = "call_" + digest[8:20].hex()
    return Answer(content, refusal, tool_name, tool_id, tool_args, finish, prompt_tokens, completion,
                  int(prompt_tokens * cached_ratio), seed)


def partial_answer(answer: Answer) -> Answer:
    """The first half of the answer, for OpenRouter's 200-with-partial-content error choice."""
    text = answer.output
    half = text[: len(text) // 2]
    return Answer(half if answer.tool_name is None else None, None, answer.tool_name, answer.tool_id,
                  half if answer.tool_name is not None else None, "error", answer.prompt_tokens,
                  (len(half) + 3) // 4, answer.cached_tokens, answer.rng_seed, answer.cache_write_tokens)


def answer_digest(seed_bytes: bytes, body: dict[str, Any]) -> bytes:
    """The digest an answer is drawn from: the seed and the canonical body, without what does not change the
    answer, so an identical request gets the identical answer whichever way (chat, stream, batch line) it came."""
    return hashlib.sha256(seed_bytes + orjson.dumps(_content_key(body), option=orjson.OPT_SORT_KEYS)).digest()


_NOT_CONTENT = ("stream", "stream_options", "prompt_cache_key", "service_tier")


def _content_key(body: dict[str, Any]) -> dict[str, Any]:
    """The body minus what does not change the answer (streaming, caching hints, the service tier), so
    streamed and plain, cached and uncached answers have the same content."""
    if any(k in body for k in _NOT_CONTENT):
        body = {k: v for k, v in body.items() if k not in _NOT_CONTENT}
    messages = body.get("messages")
    if isinstance(messages, list) and any(_marked(m) for m in messages):
        body = {**body, "messages": [_unmarked(m) if _marked(m) else m for m in messages]}
    return body


def _marked(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content)


def _unmarked(message: dict[str, Any]) -> dict[str, Any]:
    """cache_control marks out, and the text parts a mark split joined again."""
    parts: list[Any] = []
    for part in message["content"]:
        if isinstance(part, dict):
            part = {k: v for k, v in part.items() if k != "cache_control"}
        prev = parts[-1] if parts else None
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(prev, dict) \
                and prev.get("type") == "text":
            parts[-1] = {**prev, "text": str(prev.get("text", "")) + str(part.get("text", ""))}
        else:
            parts.append(part)
    if len(parts) == 1 and isinstance(parts[0], dict) and parts[0].get("type") == "text":
        return {**message, "content": parts[0].get("text", "")}
    return {**message, "content": parts}
