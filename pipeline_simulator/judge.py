"""How good the simulated model is: a truth derived from the row, per-model accuracy, calibrated logprobs.

Every row has a truth for each top-level enum and boolean field (`truth_of`, a hash of the row's text,
i.e. the last user message) and a difficulty in [0, 1) (also a hash of the text, shared by all models,
with a little per-field jitter: a hard row is hard for every model). A model with accuracy `a` is sure
of a row with probability

    c(d) = 1/k + (1 - 1/k) * sigmoid((q - d) / spread)

over the field's k values, with q chosen so the mean of c over all difficulties is `a`: it is nearly
certain of easy rows and no better than a guess on the hardest. Its most likely value is the truth with
probability c (a draw from the model's own hash of the row), else one of the other values; it gives
that value probability c and splits the rest evenly. So the reported probability is calibrated (right
c of the time), and a weaker model (smaller q) errs more, and is less sure where it errs.

Greedy requests (no temperature, or 0) answer the most likely value; sampled ones (temperature > 0,
each of `n` choices) draw from the distribution.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_GRID = [(i + 0.5) / 400 for i in range(400)]
_JITTER = 0.05


def _unit(*parts: str) -> float:
    """A uniform draw in [0, 1) from the hash of `parts`."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def truth_of(text: str, field: str, values: list[Any]) -> Any:
    """The true value of `field` for a row whose text (last user message) is `text`."""
    return values[int(_unit("truth", field, text) * len(values))]


def difficulty(text: str, field: str) -> float:
    d = _unit("difficulty", text) + (_unit("jitter", field, text) - 0.5) * 2 * _JITTER
    return min(max(d, 0.0), 1.0)


@functools.lru_cache(maxsize=256)
def _threshold(accuracy: float, k: int, spread: float) -> float:
    """q such that the mean of c(d) over d in [0, 1) is `accuracy` (bisection: c grows with q)."""
    lo, hi = -2.0, 3.0
    for _ in range(60):
        q = (lo + hi) / 2
        if sum(_sure(q, d, k, spread) for d in _GRID) / len(_GRID) < accuracy:
            lo = q
        else:
            hi = q
    return (lo + hi) / 2


def _sure(q: float, d: float, k: int, spread: float) -> float:
    x = (q - d) / spread
    s = 1 / (1 + math.exp(-x)) if x > -60 else 0.0
    return 1 / k + (1 - 1 / k) * s


@dataclass(frozen=True, slots=True)
class Judgement:
    """The model's belief about one field of one row: each allowed value's probability."""

    values: tuple[Any, ...]
    probs: tuple[float, ...]
    likely: int  # index of the most likely value

    def pick(self, rng: random.Random | None) -> int:
        """The value answered: the most likely one, or a draw when sampling."""
        if rng is None:
            return self.likely
        return rng.choices(range(len(self.values)), weights=self.probs)[0]


def judge(text: str, field: str, values: list[Any], model: str, accuracy: float, spread: float) -> Judgement:
    k = len(values)
    if k < 2:
        return Judgement(tuple(values), (1.0,) * k, 0)
    truth = values.index(truth_of(text, field, values))
    c = _sure(_threshold(min(max(accuracy, 1 / k), 1.0), k, spread), difficulty(text, field), k, spread)
    c = min(c, 0.9999)
    likely = truth
    if _unit("right", model, field, text) >= c:
        wrong = [i for i in range(k) if i != truth]
        likely = wrong[int(_unit("wrong", model, field, text) * len(wrong))]
    probs = tuple(c if i == likely else (1 - c) / (k - 1) for i in range(k))
    return Judgement(tuple(values), probs, likely)


def closed_fields(schema: Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """Top-level enum and boolean fields of an object schema, with their values."""
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    out: dict[str, list[Any]] = {}
    for name, sub in (props or {}).items():
        if not isinstance(sub, Mapping):
            continue
        if isinstance(sub.get("enum"), list) and sub["enum"]:
            out[str(name)] = list(sub["enum"])
        elif sub.get("type") == "boolean" or (isinstance(sub.get("type"), list) and "boolean" in sub["type"]):
            out[str(name)] = [True, False]
    return out


def row_text(body: Mapping[str, Any]) -> str:
    """The row's own text: the last user message (text parts joined as they are written one after the other,
    as a packed row's whole text is, packs.row_whole_text: the same row is judged the same packed or not)."""
    messages = body.get("messages")
    for msg in reversed(messages if isinstance(messages, list) else []):
        if isinstance(msg, Mapping) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


@dataclass(frozen=True, slots=True)
class Skill:
    """What the simulated models know: accuracy per model (SimConfig.accuracy, default_accuracy)."""

    accuracy: Mapping[str, float]
    default: float | None
    spread: float

    def of(self, model: str) -> float | None:
        return self.accuracy.get(model, self.default)


def judged_value(value: Any, schema: Mapping[str, Any] | None, text: str, model: str, accuracy: float,
                 spread: float, rng: random.Random | None) -> tuple[Any, dict[str, tuple[Judgement, int]]]:
    """`value` with its closed fields answered by a model of this accuracy (greedy, or drawn with `rng`)."""
    if not isinstance(value, dict):
        return value, {}
    out, judged = dict(value), {}
    for name, values in closed_fields(schema).items():
        if name not in out:
            continue
        belief = judge(text, name, values, model, accuracy, spread)
        chosen = belief.pick(rng)
        out[name] = values[chosen]
        judged[name] = (belief, chosen)
    return out, judged
