"""The answer as a model of some accuracy gives it: judged closed fields, logprobs, n samples.

Applied to the plain answer (answer.py) of a request without a content fault:
- a model with an accuracy (SimConfig.accuracy / default_accuracy) answers each top-level enum and
  boolean field as judge.py decides: the most likely value when greedy (no temperature, or 0), a draw
  from its belief when sampling;
- `logprobs: true` adds OpenAI's `logprobs.content` for message content (never for tool-call
  arguments, as OpenAI's logprobs do not cover them), with `top_logprobs` alternatives (logprobs.py);
  a streamed answer carries the same tokens, one per chunk (responses.ChunkMaker.body_chunks);
- `n > 1` adds choices 1..n-1, each an independent sample (drawn from the request's own digest, so the
  same body always gets the same samples). Usage counts the tokens of every choice.

A packed request (packs.py) is judged row by row (`apply_pack_quality`): each row's closed fields as that
row alone would be judged (its whole text, a draw of its own when sampling), the logprobs cover the whole
packed answer with each row's values written as its own tokens, and each of n samples is a whole pack.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import orjson

from .answer import Answer, Target
from .config import SimConfig
from .judge import Judgement, closed_fields, judged_value, row_text
from .logprobs import pack_tokens, plain_tokens, tokens_for
from .packs import label_digest, row_schema, row_whole_text
from .tokens import text_tokens

MAX_N = 128  # OpenAI's limit on n


def samples_asked(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1


def _asked(body: dict[str, Any], model: str, cfg: SimConfig) -> tuple[float | None, bool, tuple[bool, int]]:
    """What a request asks of the quality model: the model's accuracy, whether it samples (temperature
    above 0) and (logprobs wanted, top_logprobs)."""
    temperature = body.get("temperature")
    top = body.get("top_logprobs")
    top_n = top if isinstance(top, int) and not isinstance(top, bool) else 0
    return (cfg.accuracy.get(model, cfg.default_accuracy), isinstance(temperature, (int, float)) and temperature > 0,
            (body.get("logprobs") is True, top_n))


def apply_quality(answer: Answer, target: Target, body: dict[str, Any], model: str, cfg: SimConfig,
                  content_fault: str | None) -> Answer:
    """The answer with judged fields, logprobs and extra samples as the request asks."""
    if content_fault is not None or answer.refusal is not None or answer.finish_reason == "length":
        return answer
    accuracy, sampling, want = _asked(body, model, cfg)
    n = samples_asked(body)
    first = _one(answer, target, body, model, cfg, accuracy, want,
                 random.Random(answer.rng_seed) if sampling else None)
    if n == 1:
        return first
    more = [_one(answer, target, body, model, cfg, accuracy, want,
                 random.Random(answer.rng_seed + i) if sampling else None) for i in range(1, n)]
    return replace(first, more=more,
                   completion_tokens=first.completion_tokens + sum(m.completion_tokens for m in more))


def _one(answer: Answer, target: Target, body: dict[str, Any], model: str, cfg: SimConfig,
         accuracy: float | None, logprobs: tuple[bool, int], rng: random.Random | None) -> Answer:
    want_logprobs, top_n = logprobs
    raw = answer.tool_args if target.kind == "tool" else answer.content
    if target.kind == "text" or raw is None:
        if want_logprobs and answer.content:
            return replace(answer, logprobs=plain_tokens(answer.content))
        return answer
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return answer
    judged: dict[str, Any] = {}
    if accuracy is not None and isinstance(value, dict):
        value, judged = judged_value(value, target.schema, row_text(body), model, accuracy,
                                     cfg.difficulty_spread, rng)
    if target.kind == "tool" or not isinstance(value, dict):
        text = orjson.dumps(value).decode()
        return replace(answer, tool_args=text, completion_tokens=text_tokens(text)) if target.kind == "tool" \
            else replace(answer, content=text, completion_tokens=text_tokens(text))
    text, tokens = tokens_for(value, judged, top_n)
    return replace(answer, content=text, completion_tokens=text_tokens(text),
                   logprobs=tokens if want_logprobs else None)


def apply_pack_quality(answer: Answer, target: Target, body: dict[str, Any], model: str, cfg: SimConfig,
                       content_fault: str | None, seed: bytes) -> Answer:
    """A packed answer with each row judged as it would be alone, logprobs and n samples as asked."""
    if content_fault is not None or answer.refusal is not None or answer.finish_reason == "length" \
            or target.kind == "text" or row_schema(target.schema) is None:
        return answer
    accuracy, sampling, want = _asked(body, model, cfg)
    if accuracy is None and not want[0] and samples_asked(body) == 1:
        return answer  # nothing to judge or to add: the packed answer as drawn
    samples = [_pack_one(answer, target, body, model, cfg, accuracy, want, (seed, i if sampling else None))
               for i in range(samples_asked(body))]
    first = samples[0]
    if len(samples) == 1:
        return first
    return replace(first, more=samples[1:], completion_tokens=sum(m.completion_tokens for m in samples))


def _pack_one(answer: Answer, target: Target, body: dict[str, Any], model: str, cfg: SimConfig,
              accuracy: float | None, logprobs: tuple[bool, int], draw: tuple[bytes, int | None]) -> Answer:
    """One sample of a pack: `draw` is the simulator seed and the sample's number (None: greedy)."""
    want_logprobs, top_n = logprobs
    seed, sample = draw
    try:
        value = orjson.loads((answer.tool_args if target.kind == "tool" else answer.content) or "")
    except orjson.JSONDecodeError:
        return answer
    inner = row_schema(target.schema)
    if not isinstance(value, dict) or not isinstance(value.get("answers"), list):
        return answer
    items = []
    for item in value["answers"]:
        row: Any = item.get("answer")
        judged: dict[str, tuple[Judgement, int]] = {}
        whole = row_whole_text(body, item.get("id"))
        if accuracy is not None and isinstance(row, dict) and whole is not None and closed_fields(inner):
            rng = None if sample is None else \
                random.Random(int.from_bytes(label_digest(seed, body, whole)[:8], "big") + sample)
            row, judged = judged_value(row, inner, whole, model, accuracy, cfg.difficulty_spread, rng)
        items.append((item.get("id"), row, judged))
    text, tokens = pack_tokens(items, top_n)
    if target.kind == "tool":
        return replace(answer, tool_args=text, completion_tokens=text_tokens(text))
    return replace(answer, content=text, completion_tokens=text_tokens(text),
                   logprobs=tokens if want_logprobs else None)
