"""How sure the model was of each enum and boolean field of its answer (`quality.confidence`).

    fields = choice_fields(schema)                       # {"sentiment": ["positive", ...], "spam": [True, False]}
    by_field = logprob_confidence(tokens, output, fields)  # from choices[0].logprobs.content
    per_id = packed_logprob_confidence(tokens, {"1": out1, "2": out2}, fields)  # a pack's answer, row by row
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

Packs (`prompt.rows_per_request` > 1). One answer lists every row's answer under its pack id, and its
logprobs cover the whole text. The text is walked as JSON with character offsets (mapped to the tokens'
byte offsets): the `answers` array, each item's `id`, its `answer` object and that object's values. A
row's field is then measured exactly as above, on the tokens that write its own item's value: two rows
with the same value each get the probabilities of their own tokens, and a token written across the end
of one row's item decides nothing about the next one's. The row's logprobs are the tokens overlapping
its `answer` object.

Votes: each field's confidence is the share of samples that gave the chosen answer's value; the
chosen answer is the first sample agreeing with the most per-field majorities.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

Fields = dict[str, list[Any]]
_WS = b" \t\r\n"
Span = tuple[int, int]
Token = tuple[bytes, float, list[tuple[bytes, float]]]
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
    answer = _Answer(tokens)
    return answer.confidences(answer.top_spans(), output, fields)


def packed_logprob_confidence(tokens: Sequence[Mapping[str, Any]], outputs: Mapping[str, Any], fields: Fields
                              ) -> dict[str, tuple[dict[str, float | None], list[Mapping[str, Any]]]]:
    """A packed answer (`{"answers": [{"id": ..., "answer": {...}}, ...]}`, prepare/packs.py) measured row
    by row. Per id of `outputs` (pack id -> that row's answer): its fields' confidences, read only from
    the tokens inside its own item's `answer` object, and the tokens that overlap that object (the row's
    own logprobs). An id whose item is not in the tokens' text gets neither."""
    answer = _Answer(tokens)
    items = answer.pack_items()
    out: dict[str, tuple[dict[str, float | None], list[Mapping[str, Any]]]] = {}
    for rid, output in outputs.items():
        found = items.get(rid)
        if found is None:
            out[rid] = ({}, [])
            continue
        (start, end), spans = found
        out[rid] = (answer.confidences(spans, output, fields), answer.overlapping(start, end))
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
    shares: dict[str, float | None] = {name: counts[name][_canon(chosen[name])] / total
                                       for name in fields if name in chosen}
    return index, shares


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _token_bytes(token: Mapping[str, Any]) -> Token:
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
    return float(lp) if isinstance(lp, (int, float)) and not isinstance(lp, bool) and math.isfinite(lp) \
        else _NOT_IN_TOP * 2


def _p(logprob: float) -> float:
    return 0.0 if logprob <= _NOT_IN_TOP else math.exp(min(logprob, 0.0))


def _literal_value(raw: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw)
    except ValueError:
        return False, None


def _field_confidence(toks: list[Token], starts: list[int], text: bytes, span: Span, chosen: Any,
                      allowed: list[Any]) -> float | None:
    start, end = span
    first = _token_at(toks, starts, start)
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


def _token_at(toks: list[Token], starts: list[int], offset: int) -> int | None:
    """The index of the token that writes the byte at `offset` (token starts are sorted; empty tokens write
    nothing), or None."""
    i = bisect.bisect_right(starts, offset) - 1
    while i >= 0 and not toks[i][0]:
        i -= 1
    return i if i >= 0 and starts[i] <= offset < starts[i] + len(toks[i][0]) else None


def _lstrip_value(written: bytes, lead: bytes) -> bytes:
    """Whitespace before a value is insignificant in JSON: `": true` writes the same value as `":true`."""
    if written.startswith(lead):
        return lead + written[len(lead):].lstrip(_WS)
    return written


def _consistent(target: bytes, written: bytes) -> bool:
    """`written` could still become `target` (or has written it and goes on past it)."""
    return target.startswith(written) or written.startswith(target)


class _Answer:
    """The answer's text as its tokens wrote it, with byte offsets of each token and each character."""

    def __init__(self, tokens: Sequence[Mapping[str, Any]]) -> None:
        self.raw = [t for t in tokens if isinstance(t, Mapping)]
        self.toks = [_token_bytes(t) for t in self.raw]
        self.text = b"".join(b for b, _, _ in self.toks)
        self.starts, pos = [], 0
        for b, _, _ in self.toks:
            self.starts.append(pos)
            pos += len(b)
        # Bytes that are not UTF-8 become lone surrogates, one per byte, so the offsets stay exact.
        self.decoded = self.text.decode("utf-8", "surrogateescape")
        self.offsets = [0]
        for ch in self.decoded:
            self.offsets.append(self.offsets[-1] + (1 if "\udc80" <= ch <= "\udcff" else len(ch.encode())))

    def _bytes(self, spans: Mapping[str, Span]) -> dict[str, Span]:
        return {k: (self.offsets[s], self.offsets[e]) for k, (s, e) in spans.items()}

    def top_spans(self) -> dict[str, Span]:
        """Byte spans of the top-level object's values (fences or prose around it allowed)."""
        found = _first_object(self.decoded)
        return self._bytes(found) if found is not None else {}

    def pack_items(self) -> dict[str, tuple[Span, dict[str, Span]]]:
        """Per id of a packed answer's items: the byte span of its `answer` and of that object's values.
        The first item under an id counts (a repeated id's answers are equal, or the row is asked again)."""
        found = _first_object(self.decoded)
        answers = found.get("answers") if found is not None else None
        out: dict[str, tuple[Span, dict[str, Span]]] = {}
        for item in _array_objects(self.decoded, answers[0]) if answers is not None else []:
            rid, span = _item_id(self.decoded, item.get("id")), item.get("answer")
            if rid is None or span is None or rid in out:
                continue
            inner = _object_spans(self.decoded, span[0], _DECODER)
            values = self._bytes(inner[0]) if inner is not None else {}
            out[rid] = ((self.offsets[span[0]], self.offsets[span[1]]), values)
        return out

    def overlapping(self, start: int, end: int) -> list[Mapping[str, Any]]:
        """The tokens that write any byte of [start, end)."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        while i < len(self.toks) and self.starts[i] < end:
            if self.starts[i] + len(self.toks[i][0]) > start:
                out.append(self.raw[i])
            i += 1
        return out

    def confidences(self, spans: Mapping[str, Span], output: Any, fields: Fields) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, allowed in fields.items():
            if not isinstance(output, Mapping) or name not in output:
                continue
            span = spans.get(name)
            if span is None or _literal_value(self.text[span[0]:span[1]]) != (True, output[name]):
                out[name] = None
                continue
            out[name] = _field_confidence(self.toks, self.starts, self.text, span, output[name], allowed)
        return out


_DECODER = json.JSONDecoder()


def _first_object(s: str) -> dict[str, Span] | None:
    """Character spans of the values of the first JSON object in `s` that parses as one."""
    begin = s.find("{")
    while begin >= 0:
        found = _object_spans(s, begin, _DECODER)
        if found is not None:
            return found[0]
        begin = s.find("{", begin + 1)
    return None


def _array_objects(s: str, i: int) -> list[dict[str, Span]]:
    """The value spans of each object item of the JSON array at `i` (other items are skipped)."""
    if i >= len(s) or s[i] != "[":
        return []
    items: list[dict[str, Span]] = []
    i = _skip(s, i + 1)
    try:
        while i < len(s) and s[i] != "]":
            found = _object_spans(s, i, _DECODER) if s[i] == "{" else None
            if found is not None:
                items.append(found[0])
                i = found[1]
            else:
                _, i = _DECODER.raw_decode(s, i)
            i = _skip(s, i)
            if i < len(s) and s[i] == ",":
                i = _skip(s, i + 1)
    except ValueError:
        pass  # a broken item ends the walk; the items before it stand
    return items


def _item_id(s: str, span: Span | None) -> str | None:
    """A pack item's id as the split reads it (prepare/packs.py): a string, or an integer as text."""
    if span is None:
        return None
    value = json.loads(s[span[0]:span[1]])
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _object_spans(s: str, i: int, decoder: json.JSONDecoder) -> tuple[dict[str, Span], int] | None:
    """The character spans of the values of the object at `i`, and where it ends; None if it is none."""
    if i >= len(s) or s[i] != "{":
        return None
    spans: dict[str, Span] = {}
    i = _skip(s, i + 1)
    if i < len(s) and s[i] == "}":
        return spans, i + 1
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
            spans[str(key)] = (start, i)  # the last of a repeated key, as json.loads
            i = _skip(s, i)
            if i < len(s) and s[i] == ",":
                i = _skip(s, i + 1)
                continue
            return (spans, i + 1) if i < len(s) and s[i] == "}" else None
    except ValueError:
        return None


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i
