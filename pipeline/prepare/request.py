"""The one place a request is made: a rendered row -> an immutable `Request` with its payload and key.

    builder = RequestBuilder(base_url, plan, renderer.tokens)
    built = builder.build_batch(batch, renderer)     # every row's key or input failure, one Request per key
    request = builder.reshape(request)               # after a structured-mode fallback: a new Request
    request = builder.with_max_tokens(request, 2048) # after a truncated answer: same key, new payload

The request key is sha256 of the base URL, a newline and the canonical payload (JSON with sorted keys,
exactly the bytes sent) without its prompt-caching hints (caching.plain: `prompt_cache_key` and
`cache_control` marks do not change the answer), so any change to what is asked is a different key and
an old answer is never reused for a new question, while switching `prompt.cache` keeps every answer. The
local runner, the dry run, the dispatcher and the benchmarks all build requests here, so they agree on every
key.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from ..errors import RowError
from ..vocab import BuiltBatch, InputBatch, Request, RowFailure, canonical
from . import caching
from .prompts import RenderedRow, Renderer
from .structured import StructuredPlan
from .tokens import TokenCounter


def request_key(body: dict[str, Any], base_url: str) -> str:
    """The request key: sha256 of base_url, newline, the canonical payload without its caching hints."""
    return hashlib.sha256(base_url.encode() + b"\n" + canonical(caching.plain(body))).hexdigest()



class RequestBuilder:
    """Builds every Request of a run: shapes for the structured plan's current mode, encodes, keys."""

    def __init__(self, base_url: str, plan: StructuredPlan | None, tokens: TokenCounter) -> None:
        self.base_url = base_url
        self.plan = plan
        self.tokens = tokens  # the renderer's: the limiter, the budget and the dry run count alike
        # Prompt tokens every request shares (shaping, fixed text), counted on the first request built:
        # the dry run's "shared prefix" (the same for every row by construction, see prompts.py).
        self.shared_prefix: int | None = None

    def build(self, rendered: RenderedRow) -> Request:
        shaped, key = self._encode(rendered)
        return self._request(rendered, shaped, key)

    def _encode(self, rendered: RenderedRow) -> tuple[dict[str, Any], str]:
        shaped = self.plan.shape(rendered.body) if self.plan is not None else rendered.body
        return shaped, request_key(shaped, self.base_url)

    def _request(self, rendered: RenderedRow, shaped: dict[str, Any], key: str) -> Request:
        body = rendered.body
        # Counted on what is sent: shaping adds the schema (tools or system prompt).
        est = self.tokens.count(shaped, rendered.image_tokens)
        if self.shared_prefix is None:
            self.shared_prefix = min(est, self.tokens.count(caching.prefix_body(shaped, rendered.shared)))
        return Request(key, shaped, body, est, rendered.max_tokens, count_images(body), rendered.image_tokens,
                       self.plan.mode if self.plan is not None else None)

    def reshape(self, request: Request) -> Request:
        """The same row asked the way the run asks now (the plan's current mode): a new key."""
        body = self._with_tokens(request)
        if self.plan is None:
            return replace(request, key=request_key(body, self.base_url), shaped=body)
        shaped = self.plan.shape(body)
        return replace(request, key=request_key(shaped, self.base_url), shaped=shaped, mode=self.plan.mode,
                       est_prompt=self.tokens.count(shaped, request.image_tokens))

    def with_max_tokens(self, request: Request, max_tokens: int) -> Request:
        """A retry allowed a longer answer. The key stays: it is what the row looks its answer up by."""
        raised = replace(request, max_tokens=max_tokens)
        body = self._with_tokens(raised)
        return replace(raised, shaped=self.plan.shape(body) if self.plan is not None else body)

    @staticmethod
    def _with_tokens(request: Request) -> dict[str, Any]:
        body = request.body
        if request.max_tokens is not None and body.get("max_tokens") != request.max_tokens:
            body = {**body, "max_tokens": request.max_tokens}
        return body

    def build_batch(self, batch: InputBatch, renderer: Renderer) -> BuiltBatch:
        """Each row's input failure or request key, and one Request per distinct key."""
        n = len(batch.rows)
        failures: list[RowFailure | None] = [None] * n
        keys: list[str | None] = [None] * n
        requests: dict[str, Request] = {}
        for i, row in enumerate(batch.rows):
            err = batch.errors[i]
            if err is None:
                try:
                    rendered = renderer.render(row, batch.origins[i])
                except RowError as exc:
                    err = exc
            if err is not None:
                failures[i] = RowFailure("input", str(err))
                continue
            # Identical rows are common (a resume, repeated texts): count only once per distinct request.
            shaped, key = self._encode(rendered)
            keys[i] = key
            if key not in requests:
                requests[key] = self._request(rendered, shaped, key)
        return BuiltBatch(failures, keys, requests)


def count_images(body: dict[str, Any]) -> int:
    count = 0
    for msg in body.get("messages", ()):
        content = msg.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
    return count
