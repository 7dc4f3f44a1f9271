"""The ground floor: the vocabulary every stage shares, imported by all and importing none of them.

    input batch (read) -> Request (prepare) -> Record (send/state) -> part rows (write)

A row that never becomes a request is a `RowFailure`; an answer, good or bad, is a `Record` whose `state`
is one of the classifier's outcomes (FINAL_STATES are those a resume does not ask again).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import pyarrow as pa

from .errors import RowError


@dataclass
class InputBatch:
    index: int
    rows: list[dict[str, Any]]
    ids: list[str]
    origins: list[tuple[str, int]]
    errors: list[RowError | None]
    carried: pa.Table


# States a resume does not request again; `--retry-failed` narrows this to "ok" only.
FINAL_STATES = frozenset({"ok", "permanent", "bad_content"})


@dataclass(slots=True)
class Record:
    """Everything the outputs need about one request, plus the raw body to re-parse if ever needed."""

    key: str
    state: str
    attempts: int = 1
    status: int | None = None
    error_class: str | None = None
    message: str | None = None
    content: str | None = None
    output_json: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    provider: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    tool_calls_json: str | None = None
    logprobs_json: str | None = None
    cache_hit: bool = False
    created_at: float = 0.0
    raw: bytes | None = None
    # Added in store migration 3 (issues 19-21): prompt caching, confidence, untrusted usage.
    cached_tokens: int = 0                  # prompt tokens the provider read from its prompt cache
    cache_write_tokens: int = 0             # prompt tokens the provider wrote to its cache (Anthropic)
    confidence: float | None = None         # the row's lowest field confidence; None when not measured
    confidence_json: str | None = None      # per-field confidences, a JSON object {field: float}
    usage_note: str | None = None           # what in the server's usage could not be trusted, and what was used


@dataclass(slots=True)
class Decided(Record):
    """A row's outcome after a cascade and an audit (core/cascade.py): the deciding stage's record, with
    tokens and cost summed over the stages the row visited. Never stored: each stage's answer is."""

    cascade_stage: int | None = None        # 1-based stage that decided; None without a cascade
    audit_json: str | None = None           # {field: agrees with the reference model} for audited rows


@dataclass(slots=True)
class RowFailure:
    """A row that never became a request (bad input), with where it came from."""

    error_class: str
    message: str


def canonical(body: dict[str, Any]) -> bytes:
    """A body's one encoding: what is sent and what its request key hashes (keys sorted)."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Request:
    """One request as sent: build new ones with the builder, never change one."""

    key: str                  # what the answer is stored under (see the module docstring)
    shaped: dict[str, Any]    # the body as sent (structured shaping included); `payload` encodes it
    body: dict[str, Any]      # the rendered body before structured shaping: reshaping starts from it
    est_prompt: int           # prompt tokens of what is sent (prepare/tokens.py; shaping and images included)
    max_tokens: int | None
    n_images: int = 0
    image_tokens: int = 0
    mode: str | None = None   # the structured mode it was shaped for

    @property
    def payload(self) -> bytes:
        """The canonical JSON body, sent as is. Encoded when it is needed, not kept: the shaped body
        shares its schema and fixed text with every other request, while thousands of queued requests
        each holding the same kilobytes of encoded schema were the run's largest allocation."""
        return canonical(self.shaped)


@dataclass(slots=True)
class BuiltBatch:
    """One input batch as requests: per row an input failure or a request key; one Request per key."""

    failures: list[RowFailure | None]
    keys: list[str | None]
    requests: dict[str, Request]


class AnswerStore(Protocol):
    """Where the engine finds answers already paid for and puts new ones (see core/transformer.py)."""

    def lookup(self, keys: Collection[str]) -> dict[str, Record]:
        """The answers to reuse for those of `keys` that have one (a resume, a shared cache)."""
        ...

    async def put(self, record: Record) -> None:
        """Return once `record` is durable; it counts as done only then. Raises RunFatalError when
        nothing more can be stored (a full disk)."""
        ...

    def note(self, name: str, value: str) -> None:
        """Keep a small fact a later run starts from (the structured mode learned)."""
        ...
