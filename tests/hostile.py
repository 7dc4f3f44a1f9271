"""A small hostile server on 127.0.0.1 for tests: it answers `POST /chat/completions` with whatever the
test's `answer(n, request_body)` returns (status, JSON-able body or raw bytes), counting the requests.
It runs its own event loop in a thread, so `pipeline.run` and the CLI can talk to it as to any endpoint."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

Answer = Callable[[int, dict[str, Any]], tuple[int, Any]]


def completion(content: str, *, usage: Any = None, choices: Any = None, model: Any = "openai/gpt-4-turbo",
               **extra: Any) -> dict[str, Any]:
    """A chat.completion body; `choices` replaces the one choice holding `content`."""
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1, "model": model,
        "choices": choices if choices is not None else [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        **extra}
    if usage is not None:
        body["usage"] = usage
    return body


class HostileServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        status, body = self.answer(self.requests, orjson.loads(await request.read()))
        # The standard library's JSON, which writes integers past 64 bits as a hostile server may.
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(status=status, body=data, content_type="application/json")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> HostileServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
