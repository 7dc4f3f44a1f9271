"""The only module that touches the network: one aiohttp session, one method.

`Transport.send(payload, stream=...)` posts canonical JSON bytes to `{base_url}/chat/completions` and
returns a `Reply` (status, headers, body bytes, timings). For `stream: true` the SSE events are read
and assembled into one chat.completion body, so everything after this seam sees one shape; `ttft_s` is
the time to the first content, refusal, reasoning or tool-call token (not to the empty role chunk or a
keep-alive comment). This module does not judge answers: an error event in a stream lands in the
assembled body's `error` (as in a 200 body) and a stream that stops without a finish_reason or [DONE]
sets `Reply.cut_off`; the classifier (classify.py) decides what either means.
Network failures become `TransientError` (`code="connect"` when no connection could be made, which
the dispatcher watches to tell an endpoint that went away); a redirect or a TLS failure is run-fatal
(it will not get better, and the key must not follow a redirect to another host). Every body and error
message leaves this seam scrubbed of secret values (redact.py): a server that echoes the key cannot put
it anywhere.

The Batch API's files and batches calls (run.mode: batch) go through `files_api.FilesApi`, over this
transport's session.

Tests and benchmarks replace this class with anything that has the same `send`/`close` (a fake, or
the real class pointed at the simulator on loopback); `resolver` injects name resolution (a test
makes a name fail to resolve without sending a DNS query).
"""
from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import aiohttp.abc
import orjson

from ..common import redact
from ..errors import RequestError, RunFatalError, TransientError

_SSE_ACCEPT = {"Accept": "text/event-stream"}


@dataclass(slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    latency_s: float
    ttft_s: float | None = None
    stream: bool = False
    cut_off: bool = False  # a stream that ended without a finish_reason or [DONE]


class Transport(Protocol):
    async def send(self, payload: bytes, *, stream: bool = False) -> Reply: ...

    async def close(self) -> None: ...


# What a network failure looks like from aiohttp and asyncio; `network_error` says what it means to us.
NETWORK_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError, ssl.SSLError)


def network_error(exc: BaseException, base_url: str, elapsed_s: float) -> RequestError | RunFatalError:
    """One of NETWORK_ERRORS as our error classes, for `send` and the Batch API calls alike: a TLS failure
    is run-fatal (it will not get better), a timeout, a refused connection or a lost one transient."""
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError, ssl.SSLError)):
        inner = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
        why = getattr(inner, "verify_message", None) or getattr(inner, "reason", None) or type(exc).__name__
        return RunFatalError(f"TLS failure talking to {base_url}: {why}; check endpoint.base_url "
                             "(http or https?) and the server's certificate")
    if isinstance(exc, TimeoutError):
        return TransientError(f"no answer within the timeout ({elapsed_s:.1f}s)", code="timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransientError(f"cannot connect to {base_url}: {exc.os_error or type(exc).__name__}", code="connect")
    return TransientError(f"connection lost: {type(exc).__name__}: {exc}", code="connection")


@dataclass
class HttpTransport:
    base_url: str
    api_key: str = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    read_timeout_s: float = 120.0
    connect_timeout_s: float = 15.0
    pool_size: int = 64
    resolver: aiohttp.abc.AbstractResolver | None = field(default=None, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        redact.register(self.api_key)
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            **self.headers,
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    def session(self) -> aiohttp.ClientSession:
        """The one pooled session, opened on first use (the Batch API's calls in files_api.py share it)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size, ttl_dns_cache=300,
                                             resolver=self.resolver)
            timeout = aiohttp.ClientTimeout(
                total=self.timeout_s, sock_read=self.read_timeout_s, sock_connect=self.connect_timeout_s
            )
            # trust_env=False: no proxy or netrc from the environment gets to see or redirect the key.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers=self._headers, trust_env=False,
                skip_auto_headers=("User-Agent",), json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def send(self, payload: bytes, *, stream: bool = False) -> Reply:
        """Network text enters here: the body and every error message leave scrubbed of secrets."""
        try:
            reply = await self._send(payload, stream=stream)
        except (RequestError, RunFatalError) as exc:
            # Scrubbed in place and raised again: its cause (the aiohttp error) stays attached for a traceback.
            raise redact.scrub_error(exc)  # noqa: B904 - the same exception scrubbed in place: its own cause stays
        reply.body = redact.scrub_bytes(reply.body)
        return reply

    async def _send(self, payload: bytes, *, stream: bool) -> Reply:
        session = self.session()
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            accept = _SSE_ACCEPT if stream else None
            async with session.post(self.url, data=payload, allow_redirects=False, headers=accept) as resp:
                if 300 <= resp.status < 400:
                    raise RunFatalError(
                        f"the endpoint answered with a redirect (HTTP {resp.status}) to "
                        f"{resp.headers.get('Location', '?')}; set endpoint.base_url to the final URL "
                        "(the key is never sent across a redirect)")
                is_sse = stream and resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", "")
                if is_sse:
                    body, ttft, cut_off = await _read_sse(resp, loop, start)
                    return Reply(resp.status, resp.headers, body, loop.time() - start, ttft, True, cut_off)
                body = await resp.read()
                return Reply(resp.status, resp.headers, body, loop.time() - start)
        except NETWORK_ERRORS as exc:
            raise network_error(exc, self.base_url, loop.time() - start) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_sse(resp: aiohttp.ClientResponse, loop: asyncio.AbstractEventLoop,
                    start: float) -> tuple[bytes, float | None, bool]:
    """Read an SSE stream into one chat.completion body (bytes), the time to the first token, and
    whether it was cut off."""
    parser = SSEParser()
    acc = _Assembler()
    ttft: float | None = None
    async for chunk in resp.content.iter_any():
        for name, data in parser.feed(chunk):
            acc.event(name, data)
        if ttft is None and acc.got_token:
            ttft = loop.time() - start
    for name, data in parser.close():
        acc.event(name, data)
    if ttft is None and acc.got_token:
        ttft = loop.time() - start
    return orjson.dumps(acc.result()), ttft, acc.cut_off


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental server-sent-events decoder: bytes in, (field, data) events out.

    Lines end in LF, CRLF or a lone CR, and a CRLF may be split across two reads; a blank line ends
    an event; lines starting with ':' are comments (OpenRouter's `: OPENROUTER PROCESSING` keep-alives);
    `data` lines of one event join with LF. Besides `data`, the non-standard `error` field of older
    llama.cpp builds is kept, because a spec-only parser would silently drop that error (docs/wire.md §2.3).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for a line end, so a long event is scanned once
        self._data: list[bytes] = []
        self._error: bytes | None = None

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        buf = self._buf
        buf += chunk
        events: list[tuple[str, bytes]] = []
        pos = 0
        for m in _EOL.finditer(buf, max(0, self._scanned - 1)):
            if m.end() == len(buf) and m.group() == b"\r":
                break  # maybe the first half of a CRLF: wait for the next read
            self._line(bytes(buf[pos:m.start()]), events)
            pos = m.end()
        del buf[:pos]
        self._scanned = len(buf)
        return events

    def close(self) -> list[tuple[str, bytes]]:
        """The events left when the stream ends, including a last one without its blank line."""
        events: list[tuple[str, bytes]] = []
        if self._buf:
            self._line(bytes(self._buf.rstrip(b"\r")), events)
            self._buf.clear()
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._error is not None:
                events.append(("error", self._error))
            if self._data:
                events.append(("data", b"\n".join(self._data)))
            self._data, self._error = [], None
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"error":
            self._error = value
        # `event`, `id` and `retry` carry nothing a chat completion needs.


class _Choice:
    """One choice's pieces as its deltas arrive."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.native_finish_reason: str | None = None
        self.logprobs: list[Any] = []

    def delta(self, delta: dict[str, Any]) -> bool:
        """Add one delta; True when it carried a token."""
        got = False
        for key, sink in (("content", self.content), ("refusal", self.refusal), ("reasoning", self.reasoning)):
            text = delta.get(key)
            if isinstance(text, str) and text:
                sink.append(text)
                got = True
        calls = delta.get("tool_calls")
        for tc in calls if isinstance(calls, list) else ():
            index = tc.get("index", 0) if isinstance(tc, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                continue  # an untrusted stream's malformed call: skipped, the rest of the answer is kept
            got = True
            slot = self.tool_calls.get(index)
            if slot is None:  # not setdefault: that would build a slot for every chunk of the arguments
                slot = self.tool_calls[index] = {"type": "function", "function": {"name": "", "arguments": ""}}
            if tc.get("id"):
                slot["id"] = tc["id"]
            fn = tc.get("function")
            if isinstance(fn, dict):
                for part in ("name", "arguments"):
                    if isinstance(fn.get(part), str):
                        slot["function"][part] += fn[part]
        return got

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.reasoning:
            message["reasoning"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message

    def result(self, index: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "message": self.message(), "finish_reason": self.finish_reason}
        if self.native_finish_reason is not None:
            choice["native_finish_reason"] = self.native_finish_reason
        if self.logprobs:
            choice["logprobs"] = {"content": self.logprobs}
        return choice


_MAX_CHOICES = 128  # OpenAI's limit on n; a larger index in an untrusted stream is ignored


class _Assembler:
    """Folds chat.completion.chunk events into the non-streaming body shape, one choice per `index` (n
    samples for votes stream interleaved, each with its own finish_reason and logprobs).

    An error event (OpenRouter's mid-stream error chunk with `finish_reason: "error"`, a vLLM/llama.cpp
    `{"error":...}` event, the legacy `error:` field) is kept as the body's `error`, with whatever choice 0
    generated before it; a stream that stopped with neither every choice's finish_reason nor [DONE] is
    `cut_off`. Judging either is the classifier's job.
    """

    def __init__(self) -> None:
        self.done = False
        self.got_token = False
        self.err: dict[str, Any] | None = None
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def event(self, name: str, data: bytes) -> None:
        if name == "error":
            self._error(_loads(data, allow_text=True))
            return
        if data.strip() == b"[DONE]":
            self.done = True
            return
        self.add(_loads(data))

    def _error(self, err: Any) -> None:
        if self.err is None:
            inner = err.get("error", err) if isinstance(err, dict) else err
            self.err = inner if isinstance(inner, dict) else {"message": str(inner)}

    def add(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for k in ("id", "model", "provider", "created", "system_fingerprint", "service_tier"):
            if obj.get(k) is not None and k not in self.meta:
                self.meta[k] = obj[k]
        if obj.get("usage"):
            self.usage = obj["usage"]  # the final chunk's (choices: []); earlier chunks carry null
        if obj.get("error"):
            self._error(obj)
        for choice in obj.get("choices") or []:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_CHOICES:
                continue
            slot = self.choices.get(index)
            if slot is None:  # not setdefault: that would build a _Choice for every chunk
                slot = self.choices[index] = _Choice()
            delta = choice.get("delta")
            if isinstance(delta, dict):  # untrusted: a delta that is not an object writes nothing
                self.got_token |= slot.delta(delta)
            lp = choice.get("logprobs")  # OpenAI: the tokens this chunk writes (the role chunk's list is empty)
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                slot.logprobs.extend(lp["content"])
            if choice.get("finish_reason"):
                slot.finish_reason = choice["finish_reason"]
                slot.native_finish_reason = choice.get("native_finish_reason")
                if choice["finish_reason"] == "error":
                    self._error(choice.get("error") or {"message": "the provider ended the stream with an error"})

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.finish_reason for c in self.choices.values())

    @property
    def cut_off(self) -> bool:
        return self.err is None and not self.done and not self.finished

    def result(self) -> dict[str, Any]:
        body: dict[str, Any] = {**self.meta, "object": "chat.completion"}
        if self.err is not None or self.cut_off:
            # Tokens generated before the end are billed: keep choice 0's (and only then a choice).
            first = self.choices.get(0, _Choice())
            message = first.message()
            generated = message["content"] or first.tool_calls or self.usage
            finish = "error" if self.err is not None else None
            body["choices"] = [{"index": 0, "message": message, "finish_reason": finish}] if generated else []
            if self.err is not None:
                body["error"] = self.err
        else:
            body["choices"] = [self.choices[i].result(i) for i in sorted(self.choices)] or [
                _Choice().result(0)]
        if self.usage is not None:
            body["usage"] = self.usage
        return body


_GARBLED = {"message": "the stream carried an event that is not JSON (cut off or garbled)", "code": "malformed"}


def _loads(data: bytes, *, allow_text: bool = False) -> Any:
    """An event's JSON; a garbled one stands for an error event (the classifier judges it)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if allow_text:
            return {"message": data.decode("utf-8", "replace")}
        return {"error": dict(_GARBLED)}
