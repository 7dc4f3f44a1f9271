"""Packed requests (several rows in one request), answered row by row.

A client that packs rows (the pipeline's `prompt.rows_per_request`) sends them as the last user message,
JSON: {"rows": [{"id": "1", "input": <the row's own text>}, ...]}, and asks for an object whose
`answers` array holds {"id", "answer"} items (the per-row schema is the `answer` property, its $defs at
the root). When the rows' messages all start with the same text (a template's fixed instructions), that
text travels once, as the user message right before the rows; a row's whole message is that text plus
its input. The simulator answers each row as it would answer that row alone: a row's label is drawn from
`label_digest` (the simulator seed, the request's parameters without the transport and shaping fields,
and the row's whole message text), which is also what a one-row request's label is drawn from. So a job
gives the same labels packed and one by one, as the savings benchmark measures.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import orjson

from .content import SchemaFaker

# Fields that say how to ask or how to deliver, not what: they differ between a packed and a lone request
# for the same row, and must not change its label.
_NOT_CONTENT = frozenset({"messages", "response_format", "tools", "tool_choice", "max_tokens",
                          "max_completion_tokens", "stream", "stream_options", "structured_outputs",
                          "json_schema", "provider", "prompt_cache_key"})


def label_digest(seed: bytes, body: dict[str, Any], row_input: Any) -> bytes:
    """What a row's label is drawn from, alone or packed."""
    params = {k: v for k, v in body.items() if k not in _NOT_CONTENT}
    key = orjson.dumps({"params": params, "input": row_input}, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(seed + b"label\n" + key).digest()


def last_user_content(body: dict[str, Any]) -> Any:
    """The text of the last user message (text parts joined), or its content as is when it has others."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _text(msg.get("content"))
    return None


def _text(content: Any) -> Any:
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text") or "") for p in content)
    return content


def _lead(body: dict[str, Any]) -> str:
    """The shared start of the packed rows' messages: a user message right before the rows, if any."""
    messages = body.get("messages") or []
    if len(messages) >= 2 and isinstance(messages[-2], dict) and messages[-2].get("role") == "user":
        text = _text(messages[-2].get("content"))
        return text if isinstance(text, str) else ""
    return ""


def row_whole_text(body: dict[str, Any], rid: Any) -> str | None:
    """The whole message text of the packed row with id `rid` (the shared start and its own input), as
    that row alone would have sent it; None when the pack has no such row or its input is not text."""
    for row in pack_rows_unchecked(body) or []:
        if row.get("id") == rid:
            return _lead(body) + row["input"] if isinstance(row.get("input"), str) else None
    return None


def row_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-row schema of a pack's answer schema, or None when `schema` is not one."""
    if not isinstance(schema, dict):
        return None
    answers = (schema.get("properties") or {}).get("answers")
    items = answers.get("items") if isinstance(answers, dict) else None
    props = items.get("properties") if isinstance(items, dict) else None
    if not isinstance(props, dict) or "id" not in props or not isinstance(props.get("answer"), dict):
        return None
    return props["answer"]


def pack_rows(body: dict[str, Any], schema: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The rows of a packed request ({"id", "input"} each), or None when the request is not a pack."""
    if row_schema(schema) is None:
        return None
    return pack_rows_unchecked(body)


def pack_rows_unchecked(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The rows of the last user message when it is a pack's rows list, whatever the answer schema."""
    content = last_user_content(body)
    if not isinstance(content, str) or not content.startswith("{"):
        return None
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    rows = value.get("rows") if isinstance(value, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "id" in r and "input" in r for r in rows):
        return None
    return rows


def pack_value(seed: bytes, body: dict[str, Any], schema: dict[str, Any], rows: list[dict[str, Any]], *,
               garble: bool = False) -> Any:
    """The packed answer: each row's answer drawn as for that row alone (`garble`: a pack of several rows
    with ids 2 and 3 dropped, id 4 answered twice with different answers, an answer under id 99)."""
    inner = row_schema(schema)
    lead = _lead(body)
    answers = []
    for row in rows:
        whole = lead + row["input"] if isinstance(row["input"], str) else row["input"]
        rng = random.Random(int.from_bytes(label_digest(seed, body, whole)[:8], "big"))
        answers.append({"id": row["id"], "answer": SchemaFaker(schema, rng).value(inner)})
    if garble and len(rows) > 1:
        twice = [a for a in answers if a["id"] == "4"]
        answers = [a for a in answers if a["id"] not in ("2", "3", "4")]
        rng = random.Random(int.from_bytes(seed[:8] or b"\0", "big") ^ len(rows))
        others = [SchemaFaker(schema, rng).value(inner) for _ in range(8)]
        if twice:  # two answers that differ (drawn until they do: the schema may allow few values)
            second = next((o for o in others if o != twice[0]["answer"]), None)
            answers += [twice[0], {"id": "4", "answer": second}] if second is not None else []
        answers.append({"id": "99", "answer": others[0]})
    return {"answers": answers}
