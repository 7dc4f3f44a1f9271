"""How sure the model was of each enum and boolean field of its answer (`quality.confidence`).

    fields = choice_fields(schema)                       # {"sentiment": ["positive", ...], "spam": [True, False]}
    by_field = logprob_confidence(tokens, output, fields)  # from choices[0].logprobs.content
    index, by_field = vote_confidence(outputs, fields)     # from K sampled answers (n, or K requests)
    row = row_confidence(by_field)                         # the row's lowest field confidence

Logprobs. A field's value is a span of the answer's text; the tokens covering it carry the probability
of each token given what came before, and `top_logprobs` the most likely alternatives at each step.
Walking the value's tokens from the first one that reaches into it, an alternative token that is
consistent with only some of the allowed values (their JSON literal starts with what would have been
written, or the token runs past the literal) moves probability to those values: the mass of the path so
far times the alternative's probability. A second tokenisation of the chosen value counts for it; a
token still consistent with the chosen value and another one is left out (it decides nothing yet, and
leaving it out assumes it splits as the resolved mass does). The walk stops once only the chosen value
is possible. The confidence is the chosen value's mass among the allowed values' mass; when the server
returned no alternative at all (`top_logprobs` absent or 1), it is the chosen path's own probability.
Work is done on bytes (`bytes` of each token when given), so a character split across tokens is fine.

Votes: each field's confidence is the share of samples that gave the chosen answer's value; the
chosen answer is the first sample agreeing with the most per-field majorities.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

Fields = dict[str, list[Any]]
_WS = b" \t\r\n"
_NOT_IN_TOP = -9000.0  # OpenAI's -9999.0: "outside the top 20"


def choice_fields(schema: Mapping[str, Any] | None) -> Fields:
    """The top-level fields with a closed set of values: string/number enums and booleans (null too when
    the field is nullable), in schema order."""
    if not isinstance(schema, Mapping):
        return {}
    props = schema.get("properties")
    out: Fields = {}
    if not isinstance(props, Mapping):
        return out
    for name, sub in props.items():
        if not isinstance(sub, Mapping):
            continue
        kinds = sub.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        enum = sub.get("enum")
        if isinstance(enum, list) and enum:
            values = list(enum)
        elif "boolean" in kinds:
            values = [True, False]
        else:
            continue
        if "null" in kinds and None not in values:
            values.append(None)
        out[str(name)] = values
    return out


def compared_fields(schema: Mapping[str, Any] | None) -> list[str]:
    """The fields an audit compares: the enum and boolean ones, else the whole output ("output")."""
    return list(choice_fields(schema)) or ["output"]


def row_confidence(by_field: Mapping[str, float | None]) -> float | None:
    """The row's confidence: its least sure field (None when no field has one)."""
    known = [v for v in by_field.values() if v is not None]
    return min(known) if known else None


def logprob_confidence(tokens: Sequence[Mapping[str, Any]], output: Any, fields: Fields) -> dict[str, float | None]:
    """Per field of `fields` present in `output`, the chosen value's probability among the allowed values
    (None where the tokens do not cover the value, e.g. the answer came as tool-call arguments)."""
    toks = [_token_bytes(t) for t in tokens if isinstance(t, Mapping)]
    text = b"".join(b for b, _, _ in toks)
    starts, pos = [], 0
    for b, _, _ in toks:
        starts.append(pos)
        pos += len(b)
    spans = _value_spans(text)
    out: dict[str, float | None] = {}
    for name, allowed in fields.items():
        if not isinstance(output, Mapping) or name not in output:
            continue
        span = spans.get(name)
        if span is None or _literal_value(text[span[0]:span[1]]) != (True, output[name]):
            out[name] = None
            continue
        out[name] = _field_confidence(toks, starts, text, span, output[name], allowed)
    return out


def vote_confidence(outputs: Sequence[Any], fields: Fields) -> tuple[int, dict[str, float | None]]:
    """The sample to keep (index into `outputs`; None entries are samples that failed) and, per field,
    the share of all samples that gave the kept sample's value."""
    valid = [(i, o) for i, o in enumerate(outputs) if isinstance(o, Mapping)]
    if not valid:
        return 0, {}
    total = len(outputs)
    counts = {name: Counter(_canon(o.get(name)) for _, o in valid if name in o) for name in fields}
    majority = {name: c.most_common(1)[0][0] for name, c in counts.items() if c}
    best = max(valid, key=lambda io: (sum(1 for n, m in majority.items() if _canon(io[1].get(n)) == m), -io[0]))
    index, chosen = best
    shares: dict[str, float | None] = {name: counts[name][_canon(chosen[name])] / total for name in fields if name in chosen}
    return index, shares


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _token_bytes(token: Mapping[str, Any]) -> tuple[bytes, float, list[tuple[bytes, float]]]:
    top = [(_bytes_of(t), _logprob(t)) for t in token.get("top_logprobs") or () if isinstance(t, Mapping)]
    return _bytes_of(token), _logprob(token), top


def _bytes_of(token: Mapping[str, Any]) -> bytes:
    raw = token.get("bytes")
    if isinstance(raw, list) and raw and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    text = token.get("token")
    return text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b""


def _logprob(token: Mapping[str, Any]) -> float:
    lp = token.get("logprob")
    return float(lp) if isinstance(lp, (int, float)) and not isinstance(lp, bool) and math.isfinite(lp) else _NOT_IN_TOP * 2


def _p(logprob: float) -> float:
    return 0.0 if logprob <= _NOT_IN_TOP else math.exp(min(logprob, 0.0))


def _literal_value(raw: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw)
    except ValueError:
        return False, None


def _field_confidence(toks: list[tuple[bytes, float, list[tuple[bytes, float]]]], starts: list[int], text: bytes,
                      span: tuple[int, int], chosen: Any, allowed: list[Any]) -> float | None:
    start, end = span
    first = next((i for i, s in enumerate(starts) if s <= start < s + len(toks[i][0])), None)
    if first is None:
        return None
    base = starts[first]
    lead = text[base:start]
    chosen_key = _canon(chosen)
    targets = {_canon(v): lead + json.dumps(v, ensure_ascii=False).encode() for v in allowed}
    targets[chosen_key] = text[base:end]  # as written (escapes and all)
    alive = set(targets)
    mass: dict[str, float] = dict.fromkeys(targets, 0.0)
    path, saw_alternative = 1.0, False
    i = first
    while i < len(toks) and starts[i] < end and alive != {chosen_key}:
        actual, actual_lp, top = toks[i]
        consumed = text[base:starts[i]]
        for alt, lp in dict(top).items():
            if alt == actual:
                continue
            fits = {k for k in alive if _consistent(targets[k], _lstrip_value(consumed + alt, lead))}
            if not fits or (chosen_key in fits and len(fits) > 1):
                continue  # not an allowed value, or not decided yet
            saw_alternative = saw_alternative or _p(lp) > 0
            for k in fits:
                mass[k] += path * _p(lp) / len(fits)
        path *= _p(actual_lp)
        alive = {k for k in alive if _consistent(targets[k], _lstrip_value(consumed + actual, lead))}
        i += 1
    mass[chosen_key] += path
    if not saw_alternative:
        return round(path, 6)
    total = sum(mass.values())
    return round(mass[chosen_key] / total, 6) if total > 0 else None


def _lstrip_value(written: bytes, lead: bytes) -> bytes:
    """Whitespace before a value is insignificant in JSON: `": true` writes the same value as `":true`."""
    if written.startswith(lead):
        return lead + written[len(lead):].lstrip(_WS)
    return written


def _consistent(target: bytes, written: bytes) -> bool:
    """`written` could still become `target` (or has written it and goes on past it)."""
    return target.startswith(written) or written.startswith(target)


def _value_spans(text: bytes) -> dict[str, tuple[int, int]]:
    """Byte spans of the top-level object's values in a JSON text (fences or prose around it allowed)."""
    decoded = text.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    begin = decoded.find("{")
    while begin >= 0:
        spans = _object_spans(decoded, begin, decoder)
        if spans is not None:
            # Character offsets to byte offsets (the text may hold multi-byte characters).
            return {k: (len(decoded[:s].encode()), len(decoded[:e].encode())) for k, (s, e) in spans.items()}
        begin = decoded.find("{", begin + 1)
    return {}


def _object_spans(s: str, i: int, decoder: json.JSONDecoder) -> dict[str, tuple[int, int]] | None:
    spans: dict[str, tuple[int, int]] = {}
    i = _skip(s, i + 1)
    if i < len(s) and s[i] == "}":
        return spans
    try:
        while True:
            if i >= len(s) or s[i] != '"':
                return None
            key, i = decoder.raw_decode(s, i)
            i = _skip(s, i)
            if i >= len(s) or s[i] != ":":
                return None
            i = _skip(s, i + 1)
            start = i
            _, i = decoder.raw_decode(s, i)
            spans[str(key)] = (start, i)
            i = _skip(s, i)
            if i < len(s) and s[i] == ",":
                i = _skip(s, i + 1)
                continue
            return spans if i < len(s) and s[i] == "}" else None
    except ValueError:
        return None


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i
