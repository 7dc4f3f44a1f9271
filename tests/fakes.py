"""Fakes for the engine's injected seams: a scripted transport and an in-memory answer store.

`Scripted(answer)` is a Transport that answers each request body with `answer(body)`, which returns
`(status, json)` or `(status, json, headers)`, or a ready `Reply`, or raises (a `TransientError` with
`code="connect"` stands for a connection that could not be made). `latency_s` is spent on the
running loop's clock, so on tests/vclock.py's virtual clock it costs no real time.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import orjson

from pipeline.send.transport import Reply
from pipeline.vocab import Record

Answer = Reply | tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]]


class Scripted:
    """A Transport answering each request body with `answer(body)`; keeps the bodies and send times."""

    def __init__(self, answer: Callable[[dict[str, Any]], Answer], latency_s: float = 0.0) -> None:
        self.answer = answer
        self.latency_s = latency_s
        self.bodies: list[dict[str, Any]] = []
        self.sent_at: list[float] = []

    async def send(self, payload: bytes, *, stream: bool = False) -> Reply:
        body = orjson.loads(payload)
        self.bodies.append(body)
        self.sent_at.append(asyncio.get_running_loop().time())
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        out = self.answer(body)
        if isinstance(out, Reply):
            return out
        status, reply, *headers = out
        return Reply(status, headers[0] if headers else {}, orjson.dumps(reply), self.latency_s or 0.001)

    async def close(self) -> None:
        return None


def completion(message: dict[str, Any], finish: str = "stop", logprobs: Any = None) -> tuple[int, dict[str, Any]]:
    return 200, {"id": "gen-1", "object": "chat.completion", "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": None, **message},
                              "finish_reason": finish, "logprobs": logprobs}],
                 "usage": {"prompt_tokens": 12, "completion_tokens": 7}}


class MemoryAnswers:
    """An AnswerStore in a dict; `commit_delay_s` makes each put take that long (on the loop's clock)."""

    def __init__(self, commit_delay_s: float = 0.0) -> None:
        self.records: dict[str, Record] = {}
        self.notes: dict[str, str] = {}
        self.commit_delay_s = commit_delay_s
        self.committed_at: list[float] = []

    def lookup(self, keys: Collection[str]) -> dict[str, Record]:
        return {k: self.records[k] for k in keys if k in self.records}

    async def put(self, record: Record) -> None:
        if self.commit_delay_s:
            await asyncio.sleep(self.commit_delay_s)
        self.records[record.key] = record
        self.committed_at.append(asyncio.get_running_loop().time())

    def note(self, name: str, value: str) -> None:
        self.notes[name] = value
