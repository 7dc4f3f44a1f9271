"""The answer's text as tokens with logprobs, OpenAI's `choices[].logprobs.content` shape.

The JSON object is written piece by piece (compact, key order kept) and cut into word-sized tokens. A
judged field's value is written as its own tokens: a string's text in pieces of up to six characters
and its closing quote (so a long value is split across tokens, and two values may share a first piece),
a boolean as one token. At each of those tokens the logprob is the model's probability of that piece
given the pieces before (judge.py's distribution over the allowed values, summed over the values that
share the prefix), and `top_logprobs` lists the pieces the other values would continue with. Every
other token is certain (logprob 0).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .judge import Judgement

_PIECE = re.compile(r"[A-Za-z]{1,5}|[0-9]{1,3}|\s+|[^A-Za-z0-9\s]{1,3}|.", re.DOTALL)
_FLOOR = -9999.0


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _token(text: str, logprob: float, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    alts = top if top is not None else [(text, logprob)]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "surrogatepass"))}
                             for t, lp in alts]}


def plain_tokens(text: str) -> list[dict[str, Any]]:
    """Text the model was certain of, as tokens."""
    return [_token(p, 0.0) for p in _PIECE.findall(text)]


def _pieces(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        inner = _dumps(value)[1:-1]
        return (*(inner[i:i + 6] for i in range(0, len(inner), 6)), '"')
    return (_dumps(value),)


def _value_tokens(j: Judgement, chosen: int, top_n: int) -> list[dict[str, Any]]:
    seqs = [_pieces(v) for v in j.values]
    mine = seqs[chosen]
    out = []
    for depth, piece in enumerate(mine):
        prefix = mine[:depth]
        live = [i for i, s in enumerate(seqs) if s[:depth] == prefix and len(s) > depth]
        total = sum(j.probs[i] for i in live) or 1.0
        nxt: dict[str, float] = {}
        for i in live:
            nxt[seqs[i][depth]] = nxt.get(seqs[i][depth], 0.0) + j.probs[i] / total
        ranked = sorted(nxt.items(), key=lambda kv: -kv[1])[:max(top_n, 1)]
        top = [(t, math.log(p) if p > 0 else _FLOOR) for t, p in ranked]
        own = nxt.get(piece, 0.0)
        out.append(_token(piece, math.log(own) if own > 0 else _FLOOR, top if top_n else []))
    return out


def tokens_for(value: Mapping[str, Any], judged: Mapping[str, tuple[Judgement, int]],
               top_n: int) -> tuple[str, list[dict[str, Any]]]:
    """The compact JSON text of `value` and its tokens; `judged` maps a field to (belief, chosen index)."""
    text, toks = "{", []
    pending = "{"
    for n, (key, val) in enumerate(value.items()):
        lead = ("," if n else "") + _dumps(key) + ":"
        if key in judged:
            j, chosen = judged[key]
            lead += '"' if isinstance(val, str) else ""
            toks += plain_tokens(pending + lead)
            pending = ""
            value_toks = _value_tokens(j, chosen, top_n)
            toks += value_toks
            text += lead + "".join(t["token"] for t in value_toks)
        else:
            pending += lead + _dumps(val)
            text += lead + _dumps(val)
    toks += plain_tokens(pending + "}")
    text += "}"
    if not top_n:
        for t in toks:
            t["top_logprobs"] = []
    return text, toks


def pack_tokens(items: Sequence[tuple[Any, Any, Mapping[str, tuple[Judgement, int]]]],
                top_n: int) -> tuple[str, list[dict[str, Any]]]:
    """A packed answer ({"answers": [{"id": ..., "answer": {...}}, ...]}) as compact JSON and its tokens:
    each row's answer written as `tokens_for` writes an answer alone; `items` holds (id, answer, judged)."""
    text, toks, pending = "", [], '{"answers":['
    for n, (rid, value, judged) in enumerate(items):
        pending += ("," if n else "") + '{"id":' + _dumps(rid) + ',"answer":'
        if isinstance(value, Mapping):
            toks += plain_tokens(pending)
            text += pending
            pending = ""
            inner_text, inner = tokens_for(value, judged, top_n)
            text, toks = text + inner_text, toks + inner
        else:
            pending += _dumps(value)
        pending += "}"
    pending += "]}"
    toks += plain_tokens(pending)
    text += pending
    if not top_n:
        for t in toks:
            t["top_logprobs"] = []
    return text, toks
