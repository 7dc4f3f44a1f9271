"""Batch files on disk: pending requests streamed into JSONL files within the caps, results read back.

A request line is `{"custom_id": <request key>, "method": "POST", "url": "/v1/chat/completions",
"body": <the canonical payload the sync mode sends>}`: the custom_id IS the request key, so an answer
joins to its request however the provider orders the output, and the same body gets the same key (and
the same cached answer) in both modes. Lines go to the file as they are rendered; nothing holds a
whole file in memory.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..common import safefs
from ..config import BatchConfig
from .ledger import Chunk, Ledger

ENDPOINT = "/v1/chat/completions"
_HEAD = b'{"custom_id":"'
_MID = b'","method":"POST","url":"' + ENDPOINT.encode() + b'","body":'


def request_line(key: str, payload: bytes) -> bytes:
    return _HEAD + key.encode() + _MID + payload + b"}\n"


def request_payloads(path: str, keys: set[str]) -> Iterator[tuple[str, bytes]]:
    """(key, payload) of the lines of one of our request files whose key is in `keys`: lines to send again
    are copied from the file that carried them, not rendered from the input again."""
    with open_ours(path) as fh:
        for line in fh:
            if not line.startswith(_HEAD):
                continue
            key = line[len(_HEAD):line.find(b'"', len(_HEAD))].decode()
            if key in keys:
                yield key, line[len(_HEAD) + len(key) + len(_MID):].rstrip(b"\n")[:-1]


def max_tokens_of(payload: bytes) -> int | None:
    """The max_tokens (or max_completion_tokens) a request line's body asks for."""
    body = orjson.loads(payload)
    value = body.get("max_tokens", body.get("max_completion_tokens")) if isinstance(body, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def with_max_tokens(payload: bytes, max_tokens: int) -> bytes:
    """The same body with a raised max_tokens (the length rule of send/retry.py); the key stays."""
    body = orjson.loads(payload)
    field = "max_completion_tokens" if "max_completion_tokens" in body and "max_tokens" not in body else "max_tokens"
    return orjson.dumps({**body, field: max_tokens})


def open_new(path: str, *, append: bool = False) -> Any:
    """A file of ours in the job folder, never through a link planted there (safefs: no symlink, no hard
    link; truncated only after that check, so a planted hard link's target is never emptied)."""
    fd = safefs.open_regular(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0), 0o600)
    if not append:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "ab" if append else "wb")


def open_ours(path: str) -> Any:
    """One of our chunk, output or error files to read back; a link or anything else planted is refused."""
    fh = safefs.open_read(path)
    if fh is None:
        raise safefs.refuse(path, "missing, a link or not a plain file")
    return fh


@dataclass
class ChunkWriter:
    """Fills one chunk file after another; `add` returns a chunk when adding a line closed it. One writer
    per model: a Batch API file carries requests to one model only."""

    ledger: Ledger
    folder: str
    caps: BatchConfig
    before_line: Any = None  # the fault-injection hook (tests): called with "writing" before each line
    model: str | None = None  # the model of its lines (None: the job's endpoint.model)
    _chunk: Chunk | None = None
    _fh: Any = None
    _lines: int = 0
    _bytes: int = 0
    _tokens: int = 0
    _worst: float = 0.0
    _rows: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, key: str, payload: bytes, est: int, images: int, worst_usd: float) -> Chunk | None:
        line = request_line(key, payload)
        closed = None
        if self._chunk is not None and self._full(len(line), est):
            closed = self.close()
        if len(line) > self.caps.max_bytes:
            raise ValueError(f"one request is {len(line):,} bytes, over batch.max_bytes={self.caps.max_bytes:,}")
        if self._chunk is None:
            safefs.ensure_dir(self.folder)
            self._chunk = self.ledger.new_chunk(self.folder, self.model)
            self._fh = open_new(self._chunk.path)
        if self.before_line is not None:
            self.before_line("writing")
        self._fh.write(line)
        self._lines += 1
        self._bytes += len(line)
        self._tokens += est
        self._worst += worst_usd
        self._rows.append((key, est, images))
        if len(self._rows) >= 1000:
            self.flush()
        return closed

    @property
    def current(self) -> int | None:
        """The number of the chunk being written (the last line added went there), if one is open."""
        return self._chunk.chunk if self._chunk is not None else None

    def _full(self, size: int, est: int) -> bool:
        caps = self.caps
        over_tokens = caps.max_enqueued_tokens is not None and self._tokens + est > caps.max_enqueued_tokens
        return self._lines >= caps.max_requests or self._bytes + size > caps.max_bytes or over_tokens

    def flush(self) -> None:
        if self._chunk is not None and self._rows:
            self.ledger.add_lines(self._chunk.chunk, self._rows)
            self._rows = []

    def close(self) -> Chunk | None:
        """Finish the open chunk: file fsynced, lines recorded, then the chunk is `ready` to upload."""
        chunk = self._chunk
        if chunk is None:
            return None
        self.flush()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.ledger.update(chunk.chunk, state="ready", lines=self._lines, bytes=self._bytes,
                           est_tokens=self._tokens, worst_usd=self._worst, durable=True)
        self._chunk, self._fh = None, None
        self._lines = self._bytes = self._tokens = 0
        self._worst = 0.0
        return self.ledger.get(chunk.chunk)

    def abandon(self) -> None:
        """Stopped while writing: close the file; the chunk stays `writing` and the next run drops it."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def result_lines(path: str) -> Iterator[dict[str, Any] | str]:
    """Each line of an output or error file: the parsed object, or the raw text of a line that is not one."""
    with open_ours(path) as fh:
        for raw in fh:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield raw[:200].decode("utf-8", "replace")
                continue
            yield obj if isinstance(obj, dict) else raw[:200].decode("utf-8", "replace")
