"""Provider prompt caching (`prompt.cache: auto`): the hints a request carries so its shared part is cached.

Every row's request starts with the same bytes (tools or schema shaping, the system prompt, the fixed
text at the start of the user template) and ends with the row's own content (prompts.py renders it so,
and `RenderedRow.shared` says where the shared part ends). Providers cache that prefix in two ways:

    automatic   OpenAI (and compatible): prefixes of 1,024 tokens or more are cached on their own, in
                steps of 128; `prompt_cache_key` (one per job) routes requests that share a prefix to
                the same cache. Sent only to endpoints known to accept it (OpenAI, OpenRouter, the
                simulator): other servers may reject an unknown field.
    breakpoint  Anthropic and Gemini models (also through OpenRouter): only what ends at a
                `cache_control: {type: ephemeral}` mark is cached. The mark goes on the text part where
                the shared part ends (a user message with fixed text and row text is split in two text
                parts there), never inside row content.

Hints do not change the answer, so they are not part of the request key: `plain()` takes them out again
(the request key is the hash of the plain body; see request.py). A job keeps its answers when caching
is switched on or off, and `cache.dir` shares answers between jobs whatever their cache keys.
"""
from __future__ import annotations

from typing import Any

from ..models.catalog import prompt_cache_style

EPHEMERAL = {"type": "ephemeral"}
CACHE_KEY_FIELD = "prompt_cache_key"
# Endpoints that take prompt_cache_key (others may answer 400 to a field they do not know).
_KEY_HOSTS = ("api.openai.com", "openrouter.ai")

# Where the shared part of a body ends: (index of the message counted from the end, i.e. -1 is the last;
# characters of its text that are shared, or None for the whole message). Counted from the end because
# structured shaping may insert a system message at the front.
SharedEnd = tuple[int, int | None]


class CacheHints:
    """Adds the caching hints of one job to request bodies (`apply`); `off` adds nothing."""

    def __init__(self, mode: str, model: str, base_url: str, job_key: str) -> None:
        self.style = prompt_cache_style(model) if mode == "auto" else None
        if self.style == "automatic" and not (base_url == "simulator" or any(h in base_url for h in _KEY_HOSTS)):
            self.style = None  # cached by the provider on its own, if at all; no field it may not know
        self.key = f"pipeline-{job_key}"

    def apply(self, body: dict[str, Any], shared: SharedEnd | None) -> dict[str, Any]:
        """A new body with the hints (the input is not touched); the same body when there are none."""
        if self.style == "automatic":
            if CACHE_KEY_FIELD in body:
                return body  # the user's own (params.extra) wins
            return {**body, CACHE_KEY_FIELD: self.key}
        if self.style == "breakpoint" and shared is not None:
            messages = body.get("messages")
            if isinstance(messages, list) and -len(messages) <= shared[0] < 0:
                marked = mark(messages[shared[0]], shared[1])
                if marked is not None:
                    out = list(messages)
                    out[shared[0]] = marked
                    return {**body, "messages": out}
        return body


def mark(message: dict[str, Any], chars: int | None) -> dict[str, Any] | None:
    """The message with a cache breakpoint after its first `chars` characters of text (None: after all of
    it); None when it has nothing to mark."""
    content = message.get("content")
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = list(content)
    else:
        return None
    if chars is None:
        if not isinstance(parts[-1], dict):
            return None
        parts[-1] = {**parts[-1], "cache_control": EPHEMERAL}
        return {**message, "content": parts}
    first = next((i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "text"), None)
    if first is None or chars <= 0:
        return None
    text = str(parts[first].get("text", ""))
    head, tail = text[:chars], text[chars:]
    split: list[Any] = [{**parts[first], "text": head, "cache_control": EPHEMERAL}]
    if tail:
        split.append({**parts[first], "text": tail})
    parts[first:first + 1] = split
    return {**message, "content": parts}


def plain(body: dict[str, Any]) -> dict[str, Any]:
    """The body without caching hints, as the request key sees it: no prompt_cache_key, no cache_control
    marks, a text part split at a mark joined again, and a message left with one text part as a string."""
    if CACHE_KEY_FIELD in body:
        body = {k: v for k, v in body.items() if k != CACHE_KEY_FIELD}
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(_marked(m) for m in messages):
        return body
    return {**body, "messages": [_unmark(m) if _marked(m) else m for m in messages]}


def _marked(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content)


def _unmark(message: dict[str, Any]) -> dict[str, Any]:
    parts: list[Any] = []
    joins = False
    for part in message["content"]:
        prev = parts[-1] if parts else None
        if isinstance(part, dict) and "cache_control" in part:
            part = {k: v for k, v in part.items() if k != "cache_control"}
            parts.append(part)
            joins = part.get("type") == "text"
            continue
        if joins and isinstance(part, dict) and part.get("type") == "text" and isinstance(prev, dict) \
                and set(part) == {"type", "text"}:
            parts[-1] = {**prev, "text": str(prev.get("text", "")) + str(part.get("text", ""))}
        else:
            parts.append(part)
        joins = False
    if len(parts) == 1 and isinstance(parts[0], dict) and set(parts[0]) == {"type", "text"}:
        return {**message, "content": parts[0]["text"]}
    return {**message, "content": parts}


def prefix_body(body: dict[str, Any], shared: SharedEnd | None) -> dict[str, Any]:
    """The body cut where the shared part ends (tools and schema shaping alone when nothing is shared),
    to count the tokens every request has in common."""
    messages = body.get("messages")
    if not isinstance(messages, list) or shared is None or not -len(messages) <= shared[0] < 0:
        return {**body, "messages": []}
    end = len(messages) + shared[0]
    kept = list(messages[:end + 1])
    last, chars = kept[-1], shared[1]
    if chars is not None and isinstance(last, dict):
        content = last.get("content")
        if isinstance(content, str):
            kept[-1] = {**last, "content": content[:chars]}
        elif isinstance(content, list):
            text = next((p for p in content if isinstance(p, dict) and p.get("type") == "text"), None)
            kept[-1] = {**last, "content": str(text.get("text", ""))[:chars] if text else ""}
    return {**body, "messages": kept}
