"""Plausible strings: a small word list, JSON Schema string formats, and simple regex patterns.

Pattern support walks Python's own regex parse tree, so anything the ``re`` module parses can be
attempted; the result is checked with ``re.search`` and ``None`` means "could not satisfy".
"""

from __future__ import annotations

import random
import re
import string
import uuid
from functools import lru_cache

# The regex parser is private API but stable across 3.11+; it spares us a regex grammar of our own.
from re import _constants as sre_c  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

WORDS: tuple[str, ...] = (
    "amber", "bright", "calm", "delta", "eager", "fable", "gentle", "harbor", "ivory", "jolly",
    "kindle", "lunar", "maple", "noble", "orbit", "pepper", "quiet", "river", "silver", "timber",
    "umber", "velvet", "willow", "xenial", "yonder", "zephyr", "sturdy", "prompt", "cozy",
    "solid", "fresh", "crisp", "vivid", "humble", "tidy", "rapid", "mellow", "sunny", "rustic",
    "clever", "steady", "useful", "product", "quality", "service", "delivery", "value", "design",
    "battery", "screen", "price", "package", "support", "review", "color", "sound", "comfort",
    "works", "arrived", "would", "recommend", "again", "really", "great", "fine",
)

_CATEGORY_CHARS: dict[Any, str] = {
    sre_c.CATEGORY_DIGIT: string.digits,
    sre_c.CATEGORY_NOT_DIGIT: string.ascii_letters,
    sre_c.CATEGORY_WORD: string.ascii_letters + string.digits + "_",
    sre_c.CATEGORY_NOT_WORD: " -.,",
    sre_c.CATEGORY_SPACE: " ",
    sre_c.CATEGORY_NOT_SPACE: string.ascii_letters + string.digits,
}
_PRINTABLE = string.ascii_letters + string.digits + " _-.,:/@"
_MAX_EXTRA_REPEAT = 3  # open-ended repeats (*, +, {n,}) add at most this many items


def sentence(rng: random.Random, low: int = 8, high: int = 16) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))


def formatted(fmt: str, rng: random.Random) -> str | None:
    """A value for a JSON Schema ``format``; None for formats we do not know."""
    r = rng.randint
    if fmt == "date-time":
        return f"2024-{r(1, 12):02d}-{r(1, 28):02d}T{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z"
    if fmt == "date":
        return f"2024-{r(1, 12):02d}-{r(1, 28):02d}"
    if fmt == "time":
        return f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z"
    if fmt in ("email", "idn-email"):
        return f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.com"
    if fmt in ("hostname", "idn-hostname"):
        return f"{rng.choice(WORDS)}.example.com"
    if fmt == "ipv4":
        return f"10.{r(0, 255)}.{r(0, 255)}.{r(1, 254)}"
    if fmt == "ipv6":
        return f"2001:db8::{r(1, 0xFFFF):x}"
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if fmt in ("uri", "url", "iri", "uri-reference", "iri-reference"):
        return f"https://example.com/{rng.choice(WORDS)}/{r(1, 999)}"
    if fmt == "duration":
        return f"P{r(1, 30)}DT{r(0, 23)}H"
    return None


def from_pattern(pattern: str, rng: random.Random) -> str | None:
    """A string that ``re.search(pattern, s)`` accepts, or None when we cannot build one."""
    tree = _parse(pattern)
    if tree is None:
        return None
    out: list[str] = []
    groups: dict[int, str] = {}
    try:
        _emit(tree, rng, out, groups)
    except (ValueError, IndexError, KeyError):
        return None
    text = "".join(out)
    return text if re.search(pattern, text) else None


@lru_cache(maxsize=512)
def _parse(pattern: str) -> Any:
    try:
        return sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None


def _emit(items: Any, rng: random.Random, out: list[str], groups: dict[int, str]) -> None:
    for op, av in items:
        if op is sre_c.LITERAL:
            out.append(chr(av))
        elif op is sre_c.NOT_LITERAL:
            out.append(next(c for c in _PRINTABLE if ord(c) != av))
        elif op is sre_c.ANY:
            out.append(rng.choice(string.ascii_lowercase))
        elif op is sre_c.IN:
            out.append(_pick_in(av, rng))
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = av
            high = min(high, low + _MAX_EXTRA_REPEAT)
            for _ in range(rng.randint(low, high)):
                _emit(sub, rng, out, groups)
        elif op is sre_c.SUBPATTERN:
            group, _add, _del, sub = av
            start = len(out)
            _emit(sub, rng, out, groups)
            if group is not None:
                groups[group] = "".join(out[start:])
        elif op is sre_c.BRANCH:
            _emit(rng.choice(av[1]), rng, out, groups)
        elif op is sre_c.GROUPREF:
            out.append(groups.get(av, ""))
        elif op is sre_c.CATEGORY:
            out.append(rng.choice(_CATEGORY_CHARS.get(av, string.ascii_lowercase)))
        elif op is getattr(sre_c, "ATOMIC_GROUP", None):
            _emit(av, rng, out, groups)
        # AT (anchors), ASSERT and ASSERT_NOT add no characters.


def _pick_in(items: list[tuple[Any, Any]], rng: random.Random) -> str:
    if items and items[0][0] is sre_c.NEGATE:
        allowed = [c for c in _PRINTABLE if not _in_set(c, items[1:])]
        return rng.choice(allowed)
    op, av = rng.choice(items)
    if op is sre_c.LITERAL:
        return chr(av)
    if op is sre_c.RANGE:
        return chr(rng.randint(av[0], av[1]))
    if op is sre_c.CATEGORY:
        return rng.choice(_CATEGORY_CHARS.get(av, string.ascii_lowercase))
    raise ValueError("unsupported character class item")


def _in_set(ch: str, items: list[tuple[Any, Any]]) -> bool:
    code = ord(ch)
    for op, av in items:
        if op is sre_c.LITERAL and av == code:
            return True
        if op is sre_c.RANGE and av[0] <= code <= av[1]:
            return True
        if op is sre_c.CATEGORY and ch in _CATEGORY_CHARS.get(av, ""):
            return True
    return False


def fit_length(text: str, low: int, high: int | None, rng: random.Random) -> str:
    """Pad with words or cut so that ``low <= len(text) <= high``."""
    while len(text) < low:
        text = (text + " " + rng.choice(WORDS)).strip()
    if high is not None and len(text) > high:
        text = text[:high]
    return text
