"""``POST .../chat/completions``: decide everything at arrival, then sleep, then answer.

Order of checks (like the real services): auth -> JSON -> validation -> credits -> RPM/TPM ->
injected fault -> answer. Decisions, billing and window accounting happen at arrival, before any
latency sleep, so counts stay in arrival order and a client that disconnects while waiting has
still been billed (as OpenRouter bills aborted non-streaming requests). The exception is a hang,
billed only if it ever completes, and an edge timeout, never billed.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import packs
from .answer import Answer, answer_digest, find_target, make_answer, partial_answer
from .config import Price, SimConfig
from .content import SchemaFinder
from .envelopes import SimError, generic_error, render
from .faults import (
    BODY_FAULTS,
    TRANSPORT_FAULTS,
    ErrorContext,
    FaultChoice,
    FaultPicker,
    auth_error,
    edge_timeout_error,
    fault_error,
    payment_required,
    refusal_error,
)
from .generations import Generations
from .limits import Credits, RateLimits
from .prefix_cache import PrefixCache
from .quality import apply_pack_quality, apply_quality
from .responses import ChunkMaker, Meta, completion_body, error_200_body
from .stats import Accounting, LogEntry, redact_headers
from .streaming import abort_connection, stream_spec, write_stream
from .timing import Timing
from .tokens import ImageSizer
from .validation import Ask, ask_of

_JSON = "application/json"


@dataclass(slots=True)
class _Reply:
    """What answering a billed request needs, plain or streamed: the connection, the request, its answer
    and fault, and the response's headers and log entry as they were filled so far."""

    request: web.BaseRequest
    ask: Ask
    meta: Meta
    answer: Answer
    choice: FaultChoice | None
    headers: dict[str, str]
    entry: LogEntry

    @property
    def fault(self) -> str | None:
        return self.choice.name if self.choice is not None else None


class ChatService:
    """Per-run state of the simulated endpoint; ``Simulator.reset`` replaces it wholesale."""

    def __init__(self, cfg: SimConfig, stopping: asyncio.Event) -> None:
        self.cfg = cfg
        self.acct = Accounting(cfg.log_limit, cfg.track_bodies)
        self.faults = FaultPicker(cfg)
        self.timing = Timing(cfg, stopping)
        self.limits = RateLimits(cfg.rpm, cfg.tpm, time.monotonic(), cfg.limit_burst_s)
        self.credits = Credits(cfg.credits_usd)
        self.generations = Generations()
        self.finder = SchemaFinder()
        self.prefix = PrefixCache()
        self.sizer = ImageSizer(cfg.remote_image_size)
        self.seed_bytes = str(cfg.seed).encode() + b"\x00"
        self.nonce = os.urandom(4).hex()
        self.arrivals = 0
        self.ids = itertools.count(1)

    # -- entry point ---------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        now = time.monotonic()
        self.arrivals += 1
        arrival = self.arrivals
        choice = self.faults.pick(arrival)  # one draw per arrival, whatever happens next
        acct = self.acct
        acct.arrive(now)
        entry = LogEntry(arrival, time.time(), request.method, request.path, redact_headers(request.headers))
        if acct.log.maxlen:
            acct.log.append(entry)
        try:
            resp = await self._handle(request, now, choice, entry)
        except asyncio.CancelledError:
            entry.status = "cancelled"
            acct.status("cancelled")
            raise
        finally:
            acct.leave()
        acct.status(str(entry.status))
        return resp

    # -- planning ------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest, now: float, choice: FaultChoice | None,
                      entry: LogEntry) -> web.StreamResponse:
        headers = self._base_headers(request, now)
        ask = await self._read(request, headers, entry)
        if not isinstance(ask, Ask):
            return ask
        fault = choice.name if choice is not None else None
        answer = self.answer(ask, fault if fault in BODY_FAULTS else None)
        if fault == "model_down":
            ask.served_model = self._fallback_model(ask.body, ask.model) or ""
        refused = self._refuse(request, ask, answer, choice, now, entry)
        if refused is not None:
            return refused if isinstance(refused, web.StreamResponse) else self._error(refused, headers, entry)
        return await self._deliver(request, ask, answer, choice, headers, entry, now)

    async def _read(self, request: web.BaseRequest, headers: dict[str, str],
                    entry: LogEntry) -> Ask | web.StreamResponse:
        """Read, authenticate, parse and validate the request (in that order, as the real services do)."""
        cfg = self.cfg
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(generic_error(413), headers, entry)
        entry.digest = hashlib.sha256(raw).digest()
        entry.size = len(raw)
        if len(raw) <= cfg.log_body_max_bytes:
            entry.raw = raw
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key:
            return self._error(auth_error(missing=True), headers, entry)
        if cfg.api_key is not None and key != cfg.api_key:
            return self._error(auth_error(missing=False), headers, entry)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            msg = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your " \
                  "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON."
            return self._error(SimError(400, msg, or_message="Invalid JSON body", error_type="invalid_request"),
                               headers, entry)
        ask = self.check(body, entry.digest)
        return ask if isinstance(ask, Ask) else self._error(ask, headers, entry)

    def check(self, body: dict[str, Any], digest: bytes) -> Ask | SimError:
        """What a parsed request body asks, or the validation error it gets. Shared by chat completions
        and Batch API lines (batch_lines.py), so one body is judged the same in both."""
        return ask_of(body, digest, self.cfg, self.sizer)

    def answer(self, ask: Ask, content_fault: str | None = None) -> Answer:
        """The model's answer to a valid request: the same for the same body, whichever way it came."""
        target = find_target(ask.body, self.cfg.flavor, self.finder)
        digest = answer_digest(self.seed_bytes, ask.body)
        rows = packs.pack_rows(ask.body, target.schema)
        if rows is not None and target.schema is not None:  # several rows in one request: each answered alone
            packed = make_answer(target, digest, ask.prompt, ask.max_tokens, content_fault,
                                 self.cfg.cached_tokens_ratio,
                                 value=packs.pack_value(self.seed_bytes, ask.body, target.schema, rows,
                                                         garble=self.cfg.garble_packs))
            return apply_pack_quality(packed, target, ask.body, ask.model, self.cfg, content_fault, self.seed_bytes)
        label = packs.label_digest(self.seed_bytes, ask.body, packs.last_user_content(ask.body))
        answer = make_answer(target, digest, ask.prompt, ask.max_tokens, content_fault, self.cfg.cached_tokens_ratio,
                             label=label)
        return apply_quality(answer, target, ask.body, ask.model, self.cfg, content_fault)

    def _refuse(self, request: web.BaseRequest, ask: Ask, answer: Answer, choice: FaultChoice | None,
                now: float, entry: LogEntry) -> SimError | web.StreamResponse | None:
        """Credits, then the rate limits, then an injected fault: what turns the request away, if anything."""
        cfg = self.cfg
        price = cfg.price_for(ask.served_model or ask.model)
        ctx = ErrorContext(cfg.flavor, ask.model, cfg.provider_name, ask.text, ask.prompt, ask.max_tokens,
                           cfg.retry_after_s, cfg.tpm, {})
        refusal = self._credit_check(ctx, ask.prompt * price.input_per_m / 1e6, price.output_per_m / 1e6,
                                     ask.max_tokens)
        if refusal is not None:
            return refusal
        charged = answer.completion_tokens if cfg.tpm_charge == "usage" or ask.max_tokens is None else ask.max_tokens
        limited = self.limits.admit(ask.prompt + charged, now)
        if limited is not None:
            if cfg.flavor == "openrouter":
                ctx.rate_headers = self.limits.openrouter_headers(time.time(), limited.retry_after)
            return refusal_error(limited, ctx)
        fault = choice.name if choice is not None else None
        if fault is None:
            return None
        entry.fault = fault
        self.acct.fault(fault)
        if fault == "reset":
            abort_connection(request, rst=True)
            entry.status = "reset"
            return web.Response(status=500)
        if fault not in BODY_FAULTS and fault not in TRANSPORT_FAULTS:
            if fault.startswith("429") and cfg.flavor == "openrouter":
                wait = choice.rule.retry_after if choice and choice.rule and choice.rule.retry_after else None
                ctx.rate_headers = self.limits.openrouter_headers(time.time(), wait or cfg.retry_after_s or 1.0)
            return fault_error(fault, choice.rule if choice else None, ctx)
        if fault == "model_down" and not ask.served_model:
            return generic_error(502)
        return None

    async def _deliver(self, request: web.BaseRequest, ask: Ask, answer: Answer, choice: FaultChoice | None,
                       headers: dict[str, str], entry: LogEntry, now: float) -> web.StreamResponse:
        """Bill, wait out the latency, then answer (streamed or not)."""
        cfg = self.cfg
        fault = choice.name if choice is not None else None
        price = cfg.price_for(ask.served_model or ask.model)
        if cfg.flavor == "openai":  # remaining-* after this request was taken, as OpenAI reports
            headers.update(self.limits.openai_headers(now))
        factor = cfg.flex_price_factor if ask.body.get("service_tier") == "flex" else 1.0
        meta = self._meta(ask.served_model or ask.model, price, factor, headers)
        self.cache(ask, answer)
        stream = ask.body.get("stream") is True
        latency = self.timing.latency(answer.completion_tokens, ask.body)
        if fault == "hang":
            latency = max(latency, cfg.hang_s)
        if cfg.edge_timeout_s is not None and latency > cfg.edge_timeout_s:
            await self.timing.sleep(cfg.edge_timeout_s)
            self.acct.fault("edge_timeout")
            entry.fault = entry.fault or "edge_timeout"
            return self._error(edge_timeout_error(cfg.flavor), headers, entry)
        # Bill what was generated; a non-streaming partial-error body reports (and bills) half.
        # A hung request is billed only if it ever finishes.
        if fault not in ("error_200", "hang") and not (fault == "stream_error_legacy" and not stream):
            partial = fault in ("error_200_partial", "stream_error") and not stream
            self._bill(now, meta, partial_answer(answer) if partial else answer, ask.body)
        reply = _Reply(request, ask, meta, answer, choice, headers, entry)
        if stream:
            return await self._stream(reply, latency)
        if latency > 0 and not await self.timing.sleep(latency):
            abort_connection(request, rst=False)  # the simulator is stopping: drop hung requests
            entry.status = "hang"
            return web.Response(status=503)
        if fault == "hang":
            self._bill(time.monotonic(), meta, answer, ask.body)
        return await self._respond(reply)

    def _credit_check(self, ctx: ErrorContext, prompt_usd: float, out_per_token: float,
                      max_tokens: int | None) -> SimError | None:
        credits = self.credits
        if credits.limit is None:
            return None
        if credits.exhausted:
            if self.cfg.flavor == "openai":
                return fault_error("429_quota", None, ctx)
            return payment_required(ctx, afford=False)
        if self.cfg.credits_preflight and max_tokens and self.cfg.flavor == "openrouter":
            affordable = credits.affordable_tokens(prompt_usd, out_per_token)
            if affordable is not None and affordable < max_tokens:
                return payment_required(ctx, afford=True, can_afford=affordable)
        return None

    def _fallback_model(self, body: dict[str, Any], model: str) -> str | None:
        models = body.get("models")
        if self.cfg.flavor != "openrouter" or not isinstance(models, list):
            return None
        chain = [model] + [m for m in models if isinstance(m, str) and m != model]
        return chain[1] if len(chain) > 1 else None

    def cache(self, ask: Ask, answer: Answer) -> None:
        """The prompt cache's share of this answer (prefix_cache.py), unless a fixed ratio is configured."""
        if self.cfg.prefix_caching and not self.cfg.cached_tokens_ratio:
            answer.cached_tokens, answer.cache_write_tokens = self.prefix.use(
                ask.served_model or ask.model, ask.body, answer.prompt_tokens)

    def _meta(self, model: str, price: Price, factor: float, headers: dict[str, str]) -> Meta:
        cfg = self.cfg
        created = int(time.time())
        n = next(self.ids)
        if cfg.flavor == "openrouter":
            gen_id = headers.get("X-Generation-Id") or f"gen-{created}-{self.nonce}{n:012d}"
        else:
            gen_id = f"chatcmpl-{self.nonce}{n:020d}"
        fingerprint = "b4200-sim" if cfg.flavor == "llamacpp" else f"fp_{self.nonce[:6]}{cfg.seed % 10000:04d}"
        per = factor / 1e6
        cached = price.input_per_m if price.cached_input_per_m is None else price.cached_input_per_m
        write = price.input_per_m if price.cache_write_per_m is None else price.cache_write_per_m
        return Meta(cfg.flavor, gen_id, created, model, cfg.provider_name, fingerprint, price.input_per_m * per,
                    price.output_per_m * per, cached * per, write * per)

    def _bill(self, now: float, meta: Meta, answer: Answer, body: dict[str, Any]) -> None:
        cost = meta.cost(answer)
        self.acct.bill(now, answer.prompt_tokens, answer.completion_tokens, cost)
        self.credits.charge(cost)
        if self.cfg.flavor == "openrouter":
            self.generations.add(meta, answer, cost, body.get("stream") is True,
                                 time.monotonic() + self.cfg.generation_delay_s)

    # -- answering -----------------------------------------------------------------------------

    def _base_headers(self, request: web.BaseRequest, now: float) -> dict[str, str]:
        flavor = self.cfg.flavor
        if flavor == "openrouter":
            return {"X-Generation-Id": f"gen-{int(time.time())}-{self.nonce}{next(self.ids):012d}"}
        if flavor == "openai":
            headers = self.limits.openai_headers(now)
            headers["x-request-id"] = f"req_{self.nonce}{self.arrivals:024x}"
            headers["openai-processing-ms"] = "1"
            headers["openai-version"] = "2020-10-01"
            headers["openai-organization"] = "org-simulator"
            return headers
        if flavor == "vllm":
            return {"X-Request-Id": request.headers.get("X-Request-Id") or f"{self.nonce}{self.arrivals:024x}"}
        return {}

    def _error(self, err: SimError, headers: dict[str, str], entry: LogEntry) -> web.Response:
        status, body, extra = render(err, self.cfg.flavor, self.cfg.provider_name, legacy=self.cfg.vllm_legacy_errors)
        headers.update(extra)
        headers["Content-Type"] = _JSON
        entry.status = status
        return web.Response(status=status, body=body, headers=headers)

    async def _respond(self, reply: _Reply) -> web.StreamResponse:
        request, meta, answer, headers, entry = reply.request, reply.meta, reply.answer, reply.headers, reply.entry
        fault, rule = reply.fault, reply.choice.rule if reply.choice is not None else None
        headers["Content-Type"] = _JSON
        entry.status = 200
        if fault in ("error_200", "stream_error_legacy"):
            err = generic_error(rule.status if rule and rule.status else 502, rule.message if rule else None)
            return web.Response(body=orjson.dumps(error_200_body(meta, err)), headers=headers)
        if fault in ("error_200_partial", "stream_error"):
            err = generic_error(rule.status if rule and rule.status else 502, rule.message if rule else None)
            partial = partial_answer(answer)
            return web.Response(body=orjson.dumps(completion_body(meta, partial, err)), headers=headers)
        body = orjson.dumps(completion_body(meta, answer))
        if fault == "malformed":  # a 200 whose body is cut off: not JSON
            return web.Response(body=body[: len(body) // 2], headers=headers)
        if fault == "stream_truncate":  # promise the full length, deliver half, then drop the connection
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            abort_connection(request, rst=False)
            return resp
        if fault in (None, "model_down", "hang", "stream_no_usage"):
            self.acct.served(reply.ask.raw_digest)
        return web.Response(body=body, headers=headers)

    async def _stream(self, reply: _Reply, latency: float) -> web.StreamResponse:
        cfg, request, headers, entry, fault = self.cfg, reply.request, reply.headers, reply.entry, reply.fault
        options = reply.ask.body.get("stream_options")
        include_usage = cfg.flavor == "openrouter" or (isinstance(options, dict)
                                                       and options.get("include_usage") is True)
        if fault == "hang":
            if not await self.timing.sleep(latency):
                abort_connection(request, rst=False)
                entry.status = "hang"
                return web.StreamResponse()
            self._bill(time.monotonic(), reply.meta, reply.answer, reply.ask.body)
        spec = stream_spec(cfg, reply.choice, latency, usage_chunk=include_usage)
        headers["Content-Type"] = "text/event-stream"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(headers=headers)
        entry.status = 200
        self.acct.streams += 1
        await resp.prepare(request)
        maker = ChunkMaker(reply.meta, include_usage, cfg.stream_obfuscation, cfg.stream_error_code == "string")
        ending = await write_stream(request, resp, maker, reply.answer, spec, cfg.flavor == "openrouter")
        if ending == "truncated":
            return resp
        await resp.write_eof()
        if ending == "ok" and fault in (None, "model_down", "hang", "stream_no_usage"):
            self.acct.served(reply.ask.raw_digest)
        return resp

    # -- side endpoint data --------------------------------------------------------------------

    def generation(self, gen_id: str) -> dict[str, Any] | None:
        return self.generations.get(gen_id)
