"""Server-sent events: framing, keep-alive comments, pacing, split writes and stream faults.

With no delays and no split writes the whole stream is encoded up front and written once, which
keeps zero-latency benchmarks cheap; otherwise frames are written one by one with the pacing
the config asks for.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .answer import Answer
from .config import SimConfig
from .envelopes import SimError, error_object, generic_error
from .faults import FaultChoice
from .responses import ChunkMaker

COMMENT = b": OPENROUTER PROCESSING"
DONE = b"[DONE]"


@dataclass(slots=True)
class StreamSpec:
    comments: int  # keep-alive comments before the first token (OpenRouter only)
    comment_interval: float  # seconds; also repeats comments while waiting for the first token
    comments_between: bool  # keep-alive comments between content chunks as well
    ttft: float  # seconds until the first token
    chunk_delay: float  # seconds between content chunks
    split: bool
    split_delay: float
    crlf: bool
    chunk_chars: tuple[int, int]
    usage_chunk: bool
    usage_delay: float  # seconds before the usage chunk
    fault: str | None
    error: SimError | None  # what a stream_error / error_200 event carries
    after_chunks: int
    done_after_error: bool


def stream_spec(cfg: SimConfig, choice: FaultChoice | None, latency: float, *, usage_chunk: bool) -> StreamSpec:
    """How one answer is streamed: the config's pacing and framing, and the injected stream fault if any
    (a hung request's first token comes at once: it already waited out its latency)."""
    fault = choice.name if choice is not None else None
    rule = choice.rule if choice is not None else None
    err: SimError | None = None
    if fault in ("stream_error", "stream_error_legacy", "error_200", "error_200_partial"):
        err = generic_error(rule.status if rule and rule.status else 502, rule.message if rule else None)
        err.provider_wrap = False
        err.or_message = err.or_message if rule and rule.message else "Upstream provider disconnected"
    after = rule.after_chunks if rule and rule.after_chunks is not None else cfg.stream_error_after_chunks
    done = rule.done if rule and rule.done is not None else cfg.stream_error_done
    return StreamSpec(
        comments=cfg.stream_comments if cfg.flavor == "openrouter" else 0,
        comment_interval=cfg.stream_comment_interval_ms / 1000, ttft=0.0 if fault == "hang" else latency,
        comments_between=cfg.stream_comments_between and cfg.flavor == "openrouter",
        chunk_delay=cfg.stream_chunk_ms / 1000, split=cfg.stream_split_writes,
        split_delay=cfg.stream_split_delay_ms / 1000, crlf=cfg.stream_crlf, chunk_chars=cfg.stream_chunk_chars,
        usage_chunk=usage_chunk, usage_delay=cfg.stream_usage_delay_ms / 1000, fault=fault, error=err,
        after_chunks=after, done_after_error=done)


class _Truncate(Exception):
    """Raised inside the frame loop to cut the connection mid-stream."""


def abort_connection(request: web.BaseRequest, rst: bool) -> None:
    """Drop the connection without finishing the response.

    ``rst`` sends a TCP reset (the client sees ECONNRESET and may lose unread data); without it
    the bytes already written arrive, followed by an early EOF in the middle of the body.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if rst and sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class SSEWriter:
    def __init__(self, request: web.BaseRequest, resp: web.StreamResponse, spec: StreamSpec) -> None:
        self.request = request
        self.resp = resp
        self.spec = spec
        self.eol = b"\r\n" if spec.crlf else b"\n"
        self.paced = spec.split or spec.chunk_delay > 0 or spec.comment_interval > 0 or spec.ttft > 0 \
            or spec.usage_delay > 0
        self.buffer: list[bytes] = []

    def frame(self, payload: bytes, field: bytes = b"data") -> bytes:
        return field + b": " + payload + self.eol + self.eol

    def comment(self) -> bytes:
        return COMMENT + self.eol + self.eol

    async def emit(self, data: bytes, delay: float = 0.0) -> None:
        if not self.paced:
            self.buffer.append(data)
            return
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.spec.split or len(data) < 4:
            await self.resp.write(data)
            return
        # Cut once inside the JSON and once between the two line ends of the terminator.
        cuts = [len(data) // 2, len(data) - len(self.eol)]
        start = 0
        for cut in cuts + [len(data)]:
            await self.resp.write(data[start:cut])
            start = cut
            if cut != len(data):
                await asyncio.sleep(self.spec.split_delay)

    async def flush(self) -> None:
        if self.buffer:
            await self.resp.write(b"".join(self.buffer))
            self.buffer.clear()


async def write_stream(request: web.BaseRequest, resp: web.StreamResponse, maker: ChunkMaker, answer: Answer,
                       spec: StreamSpec, openrouter: bool) -> str:
    """Write the whole event stream; returns how it ended ("ok", "error", "truncated")."""
    w = SSEWriter(request, resp, spec)
    dumps = orjson.dumps
    if openrouter:
        for i in range(spec.comments):
            await w.emit(w.comment(), spec.comment_interval if i else 0.0)
    waited = 0.0
    if openrouter and spec.comment_interval > 0:  # keep-alives while "queued" for the first token
        while spec.ttft - waited > spec.comment_interval:
            await w.emit(w.comment(), spec.comment_interval)
            waited += spec.comment_interval
    first_delay = max(0.0, spec.ttft - waited)
    fault = spec.fault
    try:
        if fault == "error_200" and spec.error is not None:
            await w.emit(w.frame(dumps(maker.error_chunk(spec.error))), first_delay)
            if spec.done_after_error:
                await w.emit(w.frame(DONE))
            return "error"
        low, high = spec.chunk_chars
        first, middle, final = maker.body_chunks(answer, low, high)
        await w.emit(w.frame(dumps(first)), first_delay)
        cut_at = min(spec.after_chunks, len(middle))
        for i, chunk in enumerate(middle):
            if fault in ("stream_error", "stream_error_legacy", "error_200_partial", "stream_truncate") and i == cut_at:
                return await _end_badly(w, maker, spec, fault)
            data = dumps(chunk)
            if fault == "malformed" and i == 0:
                data = data[: max(1, len(data) // 2)]  # an event whose JSON never closes
            delay = spec.chunk_delay if i else 0.0
            if spec.comments_between:
                delay = await _keepalives(w, delay, spec.comment_interval)
            await w.emit(w.frame(data), delay)
        if fault in ("stream_error", "stream_error_legacy", "error_200_partial", "stream_truncate"):
            return await _end_badly(w, maker, spec, fault)
        await w.emit(w.frame(dumps(final)), spec.chunk_delay)
        if spec.usage_chunk and fault != "stream_no_usage":
            await w.emit(w.frame(dumps(maker.usage_chunk(answer))), spec.usage_delay)
        await w.emit(w.frame(DONE))
        return "ok"
    except _Truncate:
        await w.flush()
        abort_connection(request, rst=False)
        return "truncated"
    finally:
        if w.buffer and not (request.transport is None or request.transport.is_closing()):
            await w.flush()


async def _keepalives(w: SSEWriter, delay: float, interval: float) -> float:
    """Comments inside the gap before a chunk: one per interval of it, or just one when unpaced.
    Returns what is left of the gap to wait before the chunk itself."""
    if interval <= 0:
        await w.emit(w.comment())
        return delay
    while delay > interval:
        await w.emit(w.comment(), interval)
        delay -= interval
    return delay


async def _end_badly(w: SSEWriter, maker: ChunkMaker, spec: StreamSpec, fault: str | None) -> str:
    if fault == "stream_truncate":
        raise _Truncate
    assert spec.error is not None
    if fault == "stream_error_legacy":  # old llama.cpp: an SSE "error" field line, then [DONE]
        payload: Any = error_object(spec.error, "llamacpp", maker.meta.provider)
        await w.emit(w.frame(orjson.dumps(payload), b"error"))
        await w.emit(w.frame(DONE))
        return "error"
    await w.emit(w.frame(orjson.dumps(maker.error_chunk(spec.error))))
    if spec.done_after_error:
        await w.emit(w.frame(DONE))
    return "error"
