"""Batch input files checked line by line, and each line answered as the chat endpoint would answer it.

Validation follows the OpenAI Batch API: every problem is an entry `{code, line, message, param}`
(1-based line numbers) in the batch's `errors.data`, and any problem fails the whole batch. Answers come
from `ChatService.plan`, the very code that answers `POST /chat/completions`, so one request body gets
the same content and usage in both; the price is the batch price.
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

from .chat import ChatService
from .envelopes import SimError, generic_error, render
from .responses import completion_body
from .tokens import prompt_tokens

MAX_CUSTOM_ID = 512
_REQUIRED = ("custom_id", "method", "url", "body")


@dataclass(slots=True)
class Line:
    custom_id: str
    body: dict[str, Any]
    tokens: int  # estimated prompt tokens (the enqueued-token queue counts these)


def check_lines(data: bytes, endpoint: str, service: ChatService) -> tuple[list[Line], list[dict[str, Any]]]:
    """The file's requests, and every problem found (an empty list: the file is valid)."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        problem: tuple[str, str, str | None] | None = None
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
            problem = ("invalid_json_line", "This line is not parseable as valid JSON.", None)
        if problem is None and not isinstance(obj, dict):
            problem = ("invalid_json_line", "This line is not a JSON object.", None)
        if problem is None:
            problem = _line_problem(obj, endpoint, seen, model)
        if problem is not None:
            code, message, param = problem
            errors.append({"code": code, "line": n, "message": message, "param": param})
            if len(errors) >= 100:
                break
            continue
        assert isinstance(obj, dict)
        seen.add(obj["custom_id"])
        model = model or obj["body"].get("model")
        tokens, _ = prompt_tokens(obj["body"], service.sizer, service.cfg.upscale_images)
        lines.append(Line(obj["custom_id"], obj["body"], tokens))
    if not lines and not errors:
        errors.append({"code": "empty_file", "line": None, "message": "The input file has no requests.", "param": None})
    return lines, errors


def _line_problem(obj: dict[str, Any], endpoint: str, seen: set[str],
                  model: str | None) -> tuple[str, str, str | None] | None:
    for name in _REQUIRED:
        if name not in obj:
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    cid, body = obj["custom_id"], obj["body"]
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        return "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters.", "custom_id"
    if cid in seen:
        return "duplicate_custom_id", f"The custom_id '{cid[:64]}' is used more than once in this file.", "custom_id"
    if obj["method"] != "POST":
        return "invalid_method", "Only POST is supported.", "method"
    if obj["url"] != endpoint:
        return "invalid_url", f"The url must match the batch's endpoint {endpoint}.", "url"
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "missing_required_parameter", "The body must be an object with a 'model'.", "body.model"
    if model is not None and body["model"] != model:
        return "mismatched_model", f"All requests in a file must use one model ({model}).", "body.model"
    return None


def answer(service: ChatService, line: Line, fault: str | None, price_factor: float,
           status_4xx: int = 400) -> tuple[int, dict[str, Any]]:
    """(status_code, body) for one line, as the chat endpoint answers the same body, at the batch price."""
    if fault in ("4xx", "5xx"):
        return _error_body(generic_error(status_4xx if fault == "4xx" else 500), service)
    # Keyed like the chat endpoint's (digest of the canonical body), so a body answered in both modes counts 2.
    digest = hashlib.sha256(orjson.dumps(line.body, option=orjson.OPT_SORT_KEYS)).digest()
    ask = service.check(line.body, digest)
    if isinstance(ask, SimError):
        return _error_body(ask, service)
    ans = service.answer(ask, None if fault == "no_choices" else fault)
    price = service.cfg.price_for(ask.model)
    meta = service._meta(ask.model, price, price_factor, {})
    service.cache(ask, ans)
    service.acct.bill(time.monotonic(), ans.prompt_tokens, ans.completion_tokens, meta.cost(ans))
    service.acct.served(digest)
    body = completion_body(meta, ans)
    if fault == "no_choices":  # billed, and nothing answered (a provider's hiccup seen in the wild)
        body["choices"] = []
    return 200, body


def _error_body(err: SimError, service: ChatService) -> tuple[int, dict[str, Any]]:
    status, raw, _headers = render(err, service.cfg.flavor, service.cfg.provider_name)
    return status, orjson.loads(raw)


def line_faults(n: int, rates: dict[str, float], rng: random.Random) -> list[str | None]:
    """One draw per line, in input order: a fault name of `rates` ('4xx', '5xx', 'schema_invalid', 'no_choices')
    or None."""
    out: list[str | None] = []
    for _ in range(n):
        u = rng.random()
        fault = None
        for name, rate in rates.items():
            if u < rate:
                fault = name
                break
            u -= rate
        out.append(fault)
    return out
