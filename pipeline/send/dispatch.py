"""One request, from its turn under the limits to a durable record: the retry loop.

    limits.slot -> budget.reserve -> transport -> classify -> answers.put -> (slot released)
                                                     \\-> retry.decide: retry / fail / stop / reshape

Identical requests in flight are sent once. A paid answer is put in the answer store before it counts
and before its concurrency slot is released. A run-fatal outcome stops all dispatch at once: requests
waiting on a limit or the budget leave as `Stopped`, and their rows stay pending, to resume.
Collaborators are injected: the limiter, the transport, the answer store (see core/transformer.py for the
protocols), the budget, the stats and the request builder; the clock is the running loop's.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from ..config import Config
from ..errors import (
    BadContentError,
    BudgetExceeded,
    Fatal,
    PermanentError,
    RateLimited,
    RequestError,
    RunFatalError,
    Stopped,
    TransientError,
)
from ..models.catalog import cached_reads_exempt
from ..prepare.request import RequestBuilder
from ..prepare.structured import StructuredPlan
from ..prepare.tokens import TokenCounter
from ..vocab import Record, Request
from .budget import MARKUP_META, Budget, Paid, Usage, max_cost, read_usage, worst_output_tokens
from .classify import classify
from .health import Reachability
from .outcome import answer_record, failure_record
from .parse import parse_completion
from .retry import Backoff, Decision, RetryPolicy, Tries, decide
from .stats import Stats
from .transport import Reply, Transport

if TYPE_CHECKING:
    from ..vocab import AnswerStore
    from .limits import Limiter, Permit

log = logging.getLogger("pipeline")


@dataclass(slots=True)
class _Flight:
    """One request on its way: the Request as it is sent now, its tries and what they were billed."""

    request: Request
    tries: Tries
    paid: Paid


class DispatchExtras(TypedDict, total=False):
    """The optional collaborators of a Dispatcher; each has a default of its own."""

    stats: Stats | None
    budget: Budget | None
    builder: RequestBuilder | None
    rng: random.Random | None  # the backoff's jitter (tests inject a seeded one)


class Dispatcher:
    def __init__(self, cfg: Config, transport: Transport, answers: AnswerStore, limits: Limiter,
                 plan: StructuredPlan | None, **extras: Unpack[DispatchExtras]) -> None:
        self.cfg, self.transport, self.answers, self.limits, self.plan = cfg, transport, answers, limits, plan
        self.stats = extras.get("stats") or Stats()
        self.budget = extras.get("budget") or Budget(cfg.budget.max_cost_usd)
        self.builder = (extras.get("builder")
                        or RequestBuilder(cfg.endpoint.base_url, plan, TokenCounter(cfg.endpoint.model)))
        self.backoff = Backoff(cfg.limits.backoff_base_s, cfg.limits.backoff_max_s,
                               extras.get("rng") or random.Random())
        self.policy = RetryPolicy.of(cfg)
        self.reach = Reachability()
        self.fatal: Fatal | None = None
        self.stop_reason: str | None = None
        self.inflight: dict[str, asyncio.Future[Record]] = {}
        self.stream = cfg.params.stream
        self.cached_reads_free = cached_reads_exempt(cfg.endpoint.model)
        self.linked: list[Dispatcher] = []  # dispatchers of the same run (cascade stages): they stop together
        self._usage_warned = False

    def stop(self, reason: str) -> None:
        """Stop dispatching: nothing more is sent; whoever waits on a limit or the budget leaves."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.limits.stop()  # requests queued on a limit leave now instead of at the rate limit
            self.budget.close()
            for other in self.linked:
                other.stop(reason)

    async def submit(self, request: Request) -> Record:
        """The record for this request; joins an identical request already in flight."""
        fut = self.inflight.get(request.key)
        if fut is not None:
            self.stats.reused(deduplicated=1)
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[request.key] = fut
        try:
            record = await self._execute(_Flight(request, Tries(), Paid()))
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else Stopped())
            fut.exception()  # mark retrieved: joiners may be gone
            raise
        finally:
            del self.inflight[request.key]

    async def _execute(self, flight: _Flight) -> Record:
        while True:
            if self.stop_reason:
                raise Stopped()
            outcome = await self._attempt(flight)
            if isinstance(outcome, Record):
                return outcome
            if outcome.action == "stop":
                assert outcome.error is not None
                self._fatal(outcome.error)
                raise Stopped() from outcome.error
            if outcome.action == "reshape":
                flight.request = self._reshape(flight.request, outcome.max_tokens)
            elif outcome.delay_s:
                await asyncio.sleep(outcome.delay_s)

    async def _attempt(self, flight: _Flight) -> Record | Decision:
        """One attempt inside a concurrency slot: a committed record, or what to do next."""
        try:
            req = flight.request
            # Output counts at max_tokens (the model's cap when unset) until the answer says what it used.
            out = req.max_tokens if req.max_tokens is not None else worst_output_tokens(self.cfg, req.est_prompt, None)
            slot = self.limits.slot(req.est_prompt + (req.max_tokens or 0), input_tokens=req.est_prompt,
                                    output_tokens=out)
        except PermanentError as exc:  # larger than a minute's tokens: it can never be sent
            return await self._failed(exc, flight, None)
        async with slot as permit:
            if self.stop_reason:
                raise Stopped()
            if self.plan is not None and flight.request.mode != self.plan.mode:
                # Queued before a structured-mode fallback: send it the way the run asks now.
                flight.request = self.builder.reshape(flight.request)
            req = flight.request
            reserved = 0.0
            if self.budget.cap is not None:
                reserved = await self._reserve(max_cost(req.est_prompt, req.max_tokens, self.cfg, req.n_images))
            try:
                flight.tries.attempts += 1
                self.stats.sent()
                try:
                    reply = await self.transport.send(req.payload, stream=self.stream)
                except RequestError as exc:
                    # Refused by the server: nothing counted. A timeout or a lost connection may have been
                    # counted upstream: the estimate stands.
                    lost = exc.status is None and exc.code in ("timeout", "connection")
                    permit.settle(None if lost else 0)
                    return await self._failed(exc, flight, permit)
                except RunFatalError as exc:  # a redirect, a TLS failure: no request can get through
                    self._fatal(exc)
                    raise Stopped() from exc
                self.reach.answered()
                outcome = self._read(flight, reply, permit)
                if isinstance(outcome, RequestError):
                    kept = outcome.billed is not None or isinstance(outcome, BadContentError)
                    return await self._failed(outcome, flight, permit, raw=reply.body if kept else None)
                await self._commit(outcome)
                record = outcome
            finally:
                self.budget.release(reserved)
        self.stats.answered()
        self.limits.on_success()
        return record

    def _read(self, flight: _Flight, reply: Reply, permit: Permit) -> Record | RequestError:
        """A reply in hand, perhaps paid for: classified, charged and parsed into the record to commit, or
        the failure it is. Nothing in a reply may crash the run before it is kept: what we cannot read
        (our bug) becomes a bad-content failure that keeps the raw body."""
        try:
            self.limits.observe(reply.headers)
            try:
                body = classify(reply)
            except RequestError as exc:  # billed (a 200 carrying an error, no choices): what it cost
                if exc.billed:
                    self._settle(permit, self._charge(exc.billed, flight))
                else:
                    permit.settle(0)
                return exc
            usage = self._charge(body, flight)
            self._settle(permit, usage)
            return self._answer(flight, reply, body, usage)
        except BadContentError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not lose a paid answer
            log.exception("could not read the answer for %s", flight.request.key)
            return BadContentError(f"could not read the answer: {type(exc).__name__}: {exc}", reason="parser")

    async def _failed(self, exc: RequestError, flight: _Flight, permit: Permit | None,
                      raw: bytes | None = None) -> Record | Decision:
        """Decide after a failed attempt; a final failure is committed here, still inside the slot."""
        tries, req = flight.tries, flight.request
        gone = exc.code == "connect" and isinstance(exc, TransientError) and self.reach.connect_failed()
        falls_back = isinstance(exc, PermanentError) and self.plan is not None and self.plan.fallback(
            exc.status, exc.message, exc.code, mode=req.mode)
        decision = decide(exc, tries, self.policy, self.backoff, max_tokens=req.max_tokens, falls_back=falls_back,
                          endpoint_gone=gone, connect_failing=self.reach.failing)
        if decision.retry_class is not None:
            if decision.action != "fail":  # a final failure is counted as a failure, never as a retry
                self.stats.retried(decision.retry_class)
            if decision.retry_class == "bad_content":
                tries.bad_content += 1
            else:
                tries.transient += 1
        log.info("attempt %d of %s failed: %s", tries.attempts, req.key[:12], exc, extra={
            "event": "attempt_failed", "key": req.key, "attempt": tries.attempts, "status": exc.status,
            "error_class": exc.error_class, "retry_in_s": decision.retry_in_s})
        if isinstance(exc, RateLimited) and exc.retry_after is None and permit is not None:
            self.limits.decrease(permit.sent_at)  # no word on when: AIMD is all we have
        if decision.pause_s is not None:
            self.limits.pause(decision.pause_s)
        if decision.action == "retry" and (raw is not None or exc.billed):
            # Paid for, then retried under the same key: the cost is kept now, so a stop or a kill before the
            # retry's answer cannot make the store (and the next run's budget) forget it. The final record
            # replaces this one (the tally subtracts it); "transient" is asked again on resume.
            await self._commit(_failure(req.key, "transient", exc, tries.attempts, flight.paid, None))
        if decision.action != "fail":
            return decision
        assert decision.state is not None
        record = _failure(req.key, decision.state, exc, tries.attempts, flight.paid, raw)
        await self._commit(record)
        self.stats.failed(decision.state)
        return record

    def _reshape(self, req: Request, max_tokens: int | None) -> Request:
        if max_tokens is not None:
            return self.builder.with_max_tokens(req, max_tokens)
        assert self.plan is not None
        self.answers.note("structured_mode", self.plan.mode)  # the next run starts in the mode learned
        return self.builder.reshape(req)

    def _answer(self, flight: _Flight, reply: Reply, body: dict[str, Any], usage: Usage) -> Record:
        try:
            parsed = parse_completion(body, usage, self.plan, self.cfg.quality.confidence)
        except BadContentError:
            raise
        except Exception as exc:  # a parser bug must not lose a paid answer
            log.exception("could not parse the answer for %s", flight.request.key)
            raise BadContentError(f"could not parse the answer: {type(exc).__name__}: {exc}",
                                  reason="parser") from exc
        return answer_record(flight.request.key, parsed, flight.paid, attempts=flight.tries.attempts,
                             status=reply.status, raw=reply.body, latency_s=reply.latency_s, ttft_s=reply.ttft_s)

    async def _reserve(self, amount: float) -> float:
        try:
            return await self.budget.reserve(amount)
        except RunFatalError as exc:
            self._fatal(exc)
            raise Stopped() from exc

    async def _commit(self, record: Record) -> None:
        try:
            await self.answers.put(record)
        except RunFatalError as exc:  # nothing more can be stored: stop; what is committed stays
            self._fatal(exc)
            raise Stopped() from exc

    def _fatal(self, exc: Fatal) -> None:
        if self.fatal is None:
            self.fatal = exc
            # The event's message is the record's msg: LogRecord reserves the name "message".
            log.error("stopping: %s", exc, extra={"event": "stop", "reason": _reason(exc)})
        self.stop(_reason(exc))

    def _settle(self, permit: Permit, usage: Usage) -> None:
        """The limits learn what the attempt used; cached reads leave input tokens/minute where the provider
        does not count them (Anthropic)."""
        if not usage.tokens:
            permit.settle(None)
            return
        counted = usage.prompt_tokens - (usage.cached_tokens if self.cached_reads_free else 0)
        permit.settle(usage.tokens, counted, usage.completion_tokens)

    def _charge(self, body: dict[str, Any], flight: _Flight) -> Usage:
        """Count a paid attempt (a success, or a failure the provider billed anyway)."""
        req = flight.request
        usage = read_usage(body, self.cfg, req.n_images, est_prompt=req.est_prompt)
        if usage.note:
            self._untrusted(req.key, usage.note)
        if isinstance(body.get("usage"), dict) and usage.prompt_tokens > 0 and usage.calibrates:
            self.builder.tokens.observe(req.est_prompt, usage.prompt_tokens)  # calibrates estimated models
        self.budget.charge(usage.cost_usd)
        if usage.table_cost_usd is not None and self.budget.learn(usage.cost_usd, usage.table_cost_usd):
            self.answers.note(MARKUP_META, self.budget.learned())  # the next run reserves at this rate at once
        flight.paid.add(usage)
        self.stats.paid(usage.prompt_tokens, usage.completion_tokens, usage.cost_usd)
        self.stats.cached(usage.cached_tokens, usage.cache_write_tokens, usage.saved_usd)
        return usage

    def _untrusted(self, key: str, note: str) -> None:
        """Say in the log what in an answer's usage was not trusted: the first time as a warning (the
        terminal sees it), then in pipeline.log only, so a server that does it always does not flood stderr."""
        level = logging.INFO if self._usage_warned else logging.WARNING
        self._usage_warned = True
        log.log(level, "usage of the answer to %s not trusted: %s", key[:12], note,
                extra={"event": "usage_untrusted", "key": key, "note": note})


def _reason(exc: Fatal) -> str:
    return "budget" if isinstance(exc, BudgetExceeded) else "fatal"


def _failure(key: str, state: str, exc: RequestError, attempts: int, paid: Paid, raw: bytes | None) -> Record:
    return failure_record(key, state, exc, paid, attempts=attempts, raw=raw)
