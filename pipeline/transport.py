"""The only module that touches the network: one aiohttp session, one method.

`Transport.send(payload, stream=...)` posts canonical JSON bytes to `{base_url}/chat/completions` and
returns a `Reply` (status, headers, body bytes, timings). For `stream: true` the SSE events are read
and assembled into one chat.completion body, so everything after this seam sees one shape. Network
failures become `TransientError`; a redirect or a TLS failure is run-fatal (it will not get better and
the key must not follow a redirect to another host).

Tests and benchmarks replace this class with anything that has the same `send`/`close` (a fake, or
the real class pointed at the simulator on loopback).
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from .errors import RunFatalError, TransientError


@dataclass(slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    latency_s: float
    ttft_s: float | None = None
    stream: bool = False


class Transport(Protocol):
    async def send(self, payload: bytes, *, stream: bool = False) -> Reply: ...

    async def close(self) -> None: ...


@dataclass
class HttpTransport:
    base_url: str
    api_key: str = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    read_timeout_s: float = 120.0
    connect_timeout_s: float = 15.0
    pool_size: int = 64
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            **self.headers,
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size, ttl_dns_cache=300)
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
        session = self._open()
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with session.post(self.url, data=payload, allow_redirects=False) as resp:
                if 300 <= resp.status < 400:
                    raise RunFatalError(
                        f"the endpoint answered with a redirect (HTTP {resp.status}) to "
                        f"{resp.headers.get('Location', '?')}; set endpoint.base_url to the final URL "
                        "(the key is never sent across a redirect)",
                        status=resp.status,
                    )
                is_sse = stream and resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", "")
                if is_sse:
                    body, ttft = await _read_sse(resp, loop, start)
                    return Reply(resp.status, resp.headers, body, loop.time() - start, ttft, True)
                body = await resp.read()
                return Reply(resp.status, resp.headers, body, loop.time() - start)
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError, ssl.SSLError) as exc:
            raise RunFatalError(f"TLS failure talking to {self.base_url}: {type(exc).__name__}") from None
        except asyncio.TimeoutError:
            raise TransientError(f"no answer within the timeout ({loop.time() - start:.1f}s)", code="timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(
                f"cannot connect to {self.base_url}: {exc.os_error or type(exc).__name__}", code="connect"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransientError(f"connection lost: {type(exc).__name__}: {exc}", code="connection") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_sse(resp: aiohttp.ClientResponse, loop: asyncio.AbstractEventLoop, start: float) -> tuple[bytes, float | None]:
    """Read an SSE stream into one chat.completion body (bytes). Tolerates comments, CRLF, split reads."""
    acc = _Assembler()
    buf = b""
    ttft: float | None = None
    async for chunk in resp.content.iter_any():
        buf += chunk
        buf = buf.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data_lines, error_field = [], None
            for line in event.split(b"\n"):
                if not line or line.startswith(b":"):
                    continue  # keep-alive comment such as ': OPENROUTER PROCESSING'
                name, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if name == b"data":
                    data_lines.append(value)
                elif name == b"error":
                    error_field = value  # legacy llama.cpp error field, dropped by spec-only parsers
            if error_field is not None:
                acc.error(_loads_or_text(error_field))
            if not data_lines:
                continue
            data = b"\n".join(data_lines)
            if data.strip() == b"[DONE]":
                acc.done = True
                continue
            obj = _loads_or_text(data)
            if ttft is None:
                ttft = loop.time() - start
            acc.add(obj)
    if buf.strip():
        raise TransientError("the stream ended in the middle of an event", code="stream_truncated")
    if not acc.done and not acc.errored and not acc.finished:
        raise TransientError("the stream ended without a finish_reason or [DONE]", code="stream_truncated")
    return orjson.dumps(acc.result()), ttft


def _loads_or_text(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise TransientError("the stream carried an event that is not JSON", code="malformed") from None


class _Assembler:
    """Folds chat.completion.chunk events into the non-streaming body shape."""

    def __init__(self) -> None:
        self.done = False
        self.finished = False
        self.errored = False
        self.meta: dict[str, Any] = {}
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.logprobs: list[Any] = []
        self.err: Any = None

    def error(self, err: Any) -> None:
        self.errored = True
        self.err = err.get("error", err) if isinstance(err, dict) else {"message": str(err)}

    def add(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for k in ("id", "model", "provider", "created", "system_fingerprint"):
            if k in obj and k not in self.meta:
                self.meta[k] = obj[k]
        if obj.get("usage"):
            self.usage = obj["usage"]
        if "error" in obj and obj["error"]:
            self.error(obj)
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("refusal"):
                self.refusal.append(delta["refusal"])
            for tc in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(tc.get("index", 0), {"type": "function", "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            lp = choice.get("logprobs")
            if lp and lp.get("content"):
                self.logprobs.extend(lp["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.finished = True

    def result(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) if self.content else None}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self.finish_reason}
        if self.logprobs:
            choice["logprobs"] = {"content": self.logprobs}
        body: dict[str, Any] = {**self.meta, "object": "chat.completion", "choices": [choice]}
        if self.usage is not None:
            body["usage"] = self.usage
        if self.errored:
            choice["finish_reason"] = "error"
            choice["error"] = self.err
            body["error"] = self.err
        return body
