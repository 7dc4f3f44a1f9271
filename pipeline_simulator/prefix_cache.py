"""Prompt caching as the providers do it, so clients see cached tokens and their lower price without a key.

Automatic prefix caching (OpenAI and compatible, every model not listed below): a request's prompt is
read in the order the provider reads it (tools, response format, then the messages); once a prefix of
1,024 tokens or more has been seen by this simulator for the same model, a later request starting with
the same prefix reports it in `usage.prompt_tokens_details.cached_tokens`, in steps of 128 tokens.

Breakpoints (Anthropic and Gemini models): only a prefix that ends at a `cache_control` mark is cached.
The first request writes it (`cache_write_tokens`), later ones read it (`cached_tokens`).

Tokens are the simulator's own (~4 characters each, tokens.py), so the prefix of k tokens is the first
4k characters of that reading. Memory is bounded: the oldest prefixes are forgotten first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import orjson

MIN_TOKENS = 1024
STEP = 128
CHARS_PER_TOKEN = 4
_BREAKPOINT_VENDORS = ("anthropic/", "claude", "google/gemini", "gemini")


class PrefixCache:
    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def use(self, model: str, body: dict[str, Any], prompt_tokens: int) -> tuple[int, int]:
        """(cached read tokens, cache write tokens) for this request; remembers its prefixes."""
        name = model.lower()
        if name.startswith(_BREAKPOINT_VENDORS):
            return self._breakpoint(name, body, prompt_tokens)
        return self._automatic(name, body, prompt_tokens)

    def _automatic(self, model: str, body: dict[str, Any], prompt_tokens: int) -> tuple[int, int]:
        text, _ = _reading(body)
        most = min(prompt_tokens, len(text) // CHARS_PER_TOKEN)
        if most < MIN_TOKENS:
            return 0, 0
        h = hashlib.sha1(model.encode() + b"\0", usedforsecurity=False)
        done, cached = 0, 0
        size = MIN_TOKENS
        while size <= most:
            h.update(text[done * CHARS_PER_TOKEN:size * CHARS_PER_TOKEN].encode())
            done = size
            digest = h.copy().digest()
            if self._hit(digest):
                cached = size
            size += STEP
        return cached, 0

    def _breakpoint(self, model: str, body: dict[str, Any], prompt_tokens: int) -> tuple[int, int]:
        text, marked = _reading(body)
        tokens = min(prompt_tokens, marked // CHARS_PER_TOKEN)
        if marked == 0 or tokens < MIN_TOKENS:
            return 0, 0
        digest = hashlib.sha1(model.encode() + b"\0" + text[:marked].encode(), usedforsecurity=False).digest()
        return (tokens, 0) if self._hit(digest) else (0, tokens)

    def _hit(self, digest: bytes) -> bool:
        """Whether the prefix was seen; either way it is the most recent one now."""
        seen = self._seen
        if digest in seen:
            seen.move_to_end(digest)
            return True
        seen[digest] = None
        if len(seen) > self.max_entries:
            seen.popitem(last=False)
        return False


def _reading(body: dict[str, Any]) -> tuple[str, int]:
    """The prompt as one string in the provider's order, and where its last cache_control mark ends."""
    out: list[str] = []
    length, marked = 0, 0
    for field in ("tools", "response_format"):
        if body.get(field):
            piece = orjson.dumps(body[field], option=orjson.OPT_SORT_KEYS).decode()
            out.append(piece)
            length += len(piece)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        head = f"\n<{message.get('role')}>"
        out.append(head)
        length += len(head)
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                piece = str(part.get("text", ""))
            else:
                piece = orjson.dumps(part.get("image_url") or part, option=orjson.OPT_SORT_KEYS).decode()
            out.append(piece)
            length += len(piece)
            if "cache_control" in part:
                marked = length
    return "".join(out), marked
