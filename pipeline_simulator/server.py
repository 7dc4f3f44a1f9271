"""The simulator's HTTP server: lifecycle, routes, and the side endpoints.

Routes:
- ``POST /api/v1/chat/completions`` and ``POST /v1/chat/completions`` (one handler)
- ``GET /api/v1/key``, ``GET /api/v1/generation?id=`` (OpenRouter side endpoints, auth required)
- ``/files`` and ``/batches`` under the API root: the OpenAI Batch API (batch.py)
- ``GET /_sim/stats``, ``GET /_sim/requests?since=N&limit=M``, ``POST /_sim/reset`` (test hooks;
  the reset body may carry SimConfig overrides, e.g. a new ``fault_plan``)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Self

import orjson
from aiohttp import web

from .batch import BatchService
from .chat import ChatService
from .config import SimConfig
from .envelopes import render
from .faults import auth_error

LOOPBACK = "127.0.0.1"
_JSON = "application/json"


class Simulator:
    """An OpenAI/OpenRouter-compatible endpoint on loopback; deterministic for a given seed."""

    def __init__(self, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else SimConfig()
        self._stopping = asyncio.Event()
        self.service = ChatService(self.cfg, self._stopping)
        self.batches = BatchService(self.cfg.batch, self.cfg.seed)
        self._runner: web.ServerRunner | None = None
        self.base_url: str | None = None
        self.port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str = LOOPBACK, port: int = 0) -> str:
        """Serve on ``host:port`` (port 0 picks a free one); returns the API root URL."""
        if host != LOOPBACK:
            raise ValueError(f"the simulator only listens on {LOOPBACK}, not {host!r}")
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        self._stopping = asyncio.Event()
        self.service.timing.stopping = self._stopping
        loop = asyncio.get_running_loop()
        max_body = self.cfg.max_body_bytes

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

        # The low-level server with a dict of routes costs noticeably less per request than an
        # Application with its router and middleware chain. handler_cancellation: a client that
        # gives up cancels its handler (hangs, latency sleeps).
        server = web.Server(self._dispatch, request_factory=make_request, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.base_url = f"http://{host}:{self.port}{self.cfg.api_root_path()}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # releases hung requests before the runner waits for handlers
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self, **overrides: Any) -> None:
        """Forget counters, log, buckets and credits; optionally change config fields."""
        if overrides:
            self.cfg = SimConfig.model_validate({**self.cfg.model_dump(), **overrides})
        self.service = ChatService(self.cfg, self._stopping)
        self.batches = BatchService(self.cfg.batch, self.cfg.seed)

    # -- accounting ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        out = self.service.acct.snapshot()
        credits = self.service.credits
        out["credits"] = {"limit_usd": credits.limit, "used_usd": round(credits.usage, 10),
                          "remaining_usd": credits.remaining}
        out["batch"] = self.batches.stats()
        return out

    @property
    def log(self) -> list[dict[str, Any]]:
        return [entry.as_dict() for entry in list(self.service.acct.log)]

    # -- handlers ------------------------------------------------------------------------------

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path in _CHAT_PATHS:
            if request.method != "POST":
                return _json({"error": {"code": 405, "message": "Method Not Allowed"}}, status=405)
            return await self.service.handle(request)
        root = self.cfg.api_root_path()
        if path.startswith((root + "/files", root + "/batches")):
            denied = self._authorized(request)
            return denied if denied is not None else await self.batches.handle(path[len(root):], request, self.service)
        route = _ROUTES.get((request.method, path))
        if route is None:
            return _json({"error": {"code": 404, "message": f"Not Found: {request.method} {path}"}}, status=404)
        return await route(self, request)

    def _authorized(self, request: web.BaseRequest) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if key and (self.cfg.api_key is None or key == self.cfg.api_key):
            return None
        status, body, headers = render(auth_error(missing=not key), self.cfg.flavor, self.cfg.provider_name)
        headers["Content-Type"] = _JSON
        return web.Response(status=status, body=body, headers=headers)

    async def _key(self, request: web.BaseRequest) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        self.service.acct.other_requests += 1
        credits = self.service.credits
        usage = round(credits.usage, 10)
        data = {"label": "sk-or-v1-sim...", "limit": credits.limit, "limit_remaining": credits.remaining,
                "limit_reset": None, "include_byok_in_limit": False, "usage": usage, "usage_daily": usage,
                "usage_weekly": usage, "usage_monthly": usage, "byok_usage": 0, "byok_usage_daily": 0,
                "byok_usage_weekly": 0, "byok_usage_monthly": 0, "is_free_tier": False,
                "is_management_key": False, "is_provisioning_key": False, "expires_at": None,
                "creator_user_id": "user_sim_0001", "rate_limit": {"requests": -1, "interval": "10s"}}
        return _json({"data": data})

    async def _generation(self, request: web.BaseRequest) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        self.service.acct.other_requests += 1
        record = self.service.generation(request.query.get("id", ""))
        if record is None:
            return _json({"error": {"code": 404, "message": "Generation not found"}}, status=404)
        return _json({"data": record})

    async def _stats(self, request: web.BaseRequest) -> web.Response:
        return _json(self.stats)

    async def _requests(self, request: web.BaseRequest) -> web.Response:
        entries = list(self.service.acct.log)
        since = _int(request.query.get("since"), 0)
        if since:
            entries = [e for e in entries if e.n > since]
        limit = _int(request.query.get("limit"), 0)
        if limit:
            entries = entries[-limit:]
        return _json([e.as_dict() for e in entries])

    async def _reset(self, request: web.BaseRequest) -> web.Response:
        raw = await request.read()
        overrides: Any = orjson.loads(raw) if raw.strip() else {}
        if not isinstance(overrides, dict):
            return _json({"error": "expected a JSON object of SimConfig overrides"}, status=400)
        try:
            self.reset(**overrides)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            return _json({"error": str(exc)}, status=400)
        return _json({"ok": True})


_CHAT_PATHS = frozenset({"/api/v1/chat/completions", "/v1/chat/completions"})
_ROUTES: dict[tuple[str, str], Callable[[Simulator, web.BaseRequest], Awaitable[web.Response]]] = {
    ("GET", "/api/v1/key"): Simulator._key, ("GET", "/v1/key"): Simulator._key,
    ("GET", "/api/v1/generation"): Simulator._generation, ("GET", "/v1/generation"): Simulator._generation,
    ("GET", "/_sim/stats"): Simulator._stats, ("GET", "/_sim/requests"): Simulator._requests,
    ("POST", "/_sim/reset"): Simulator._reset,
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default
