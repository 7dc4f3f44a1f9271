"""One request, from its turn under the limits to a durable record: the retry loop.

limits -> transport -> classify -> store -> parse. Identical requests in flight are sent once. A
paid answer is written to the store before it counts; unusable content gets its own small retry
budget; a run-fatal answer stops all dispatch at once (the rows it stops stay pending, to resume).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import diagnosis
from ..config import Config
from ..errors import (
    BadContentError,
    BudgetExceeded,
    PermanentError,
    RateLimited,
    RequestError,
    RunFatalError,
    TransientError,
)
from .limits import Limits
from ..write.parse import Usage, max_cost, parse_completion, read_usage
from ..build.prompts import estimate_prompt_tokens, finalize
from .retry import Backoff, classify
from ..state.store import Record, Store
from ..build.structured import StructuredPlan
from .transport import Transport

log = logging.getLogger("pipeline")


class Stopped(Exception):
    """Dispatch has stopped (run-fatal, budget or interrupt); the request stays pending."""


@dataclass(slots=True)
class Job:
    key: str
    payload: bytes
    draft_body: dict[str, Any]
    est_prompt: int
    max_tokens: int | None
    n_images: int = 0
    image_tokens: int = 0
    mode: str | None = None


@dataclass
class Stats:
    requests_sent: int = 0
    successes: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    deduplicated: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter[str] = field(default_factory=Counter)


class Dispatcher:
    def __init__(
        self,
        cfg: Config,
        transport: Transport,
        store: Store,
        limits: Limits,
        plan: StructuredPlan | None,
        *,
        cache: Store | None = None,
        spent_before: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.store = store
        self.cache = cache
        self.limits = limits
        self.plan = plan
        self.backoff = Backoff(cfg.limits.backoff_base_s, cfg.limits.backoff_max_s, rng or random.Random())
        self.stats = Stats()
        self.spent = spent_before
        self.reserved = 0.0
        self.fatal: RunFatalError | None = None
        self.stop_reason: str | None = None
        self.inflight: dict[str, asyncio.Future[Record]] = {}
        self.stream = cfg.params.stream

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.limits.stop()  # requests queued on a limit leave now instead of at the rate limit

    async def submit(self, job: Job) -> Record:
        """The record for this request; joins an identical request already in flight."""
        fut = self.inflight.get(job.key)
        if fut is not None:
            self.stats.deduplicated += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[job.key] = fut
        try:
            record = await self._execute(job)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else Stopped())
            fut.exception()  # mark retrieved: joiners may be gone
            raise
        finally:
            del self.inflight[job.key]

    async def _execute(self, job: Job) -> Record:
        transient = bad = attempts = 0
        paid = [0, 0, 0.0]  # prompt tokens, completion tokens, cost across attempts of this request
        payload, key, max_tokens = job.payload, job.key, job.max_tokens
        while True:
            if self.stop_reason:
                raise Stopped()
            reserve = max_cost(job.est_prompt, max_tokens, self.cfg, job.n_images)
            self._reserve(reserve)
            try:
                est_tokens = job.est_prompt + (max_tokens or 0)
                try:
                    async with self.limits.slot(est_tokens) as permit:
                        if self.stop_reason:
                            raise Stopped()
                        if self.plan is not None and job.mode != self.plan.mode:
                            # Queued before a structured-mode fallback: send it the way the run asks now.
                            payload, key = self._reshape(job, max_tokens)
                        attempts += 1
                        self.stats.requests_sent += 1
                        try:
                            reply = await self.transport.send(payload, stream=self.stream)
                            self.limits.observe(reply.headers)
                            body = classify(reply)
                        except RequestError as exc:
                            permit.settle(self._charge(exc.billed, job, paid) if exc.billed else 0)
                            raise
                        usage = self._usage(body, job)
                        permit.settle(usage.prompt_tokens + usage.completion_tokens or None)
                finally:
                    self.reserved -= reserve
            except RunFatalError as exc:
                self._fatal(exc)
                raise Stopped() from None
            except RateLimited as exc:
                transient += 1
                self.stats.retries["rate_limited"] += 1
                wait = exc.retry_after if exc.retry_after is not None else self.backoff.delay(transient)
                longest = self.cfg.limits.max_retry_after_s
                if wait > longest:
                    # Every request would hear the same: stop (resumable) rather than pause the run for ages.
                    self._fatal(RunFatalError(
                        f"{exc}; the server asks to wait {wait:.0f}s, more than limits.max_retry_after_s={longest:g}: "
                        "re-run the same command after that to resume", status=exc.status))
                    raise Stopped() from None
                self.limits.pause(wait)
                if transient > self.cfg.limits.max_retries:
                    return await self._fail(key, "transient", exc, attempts, paid)
                continue
            except TransientError as exc:
                transient += 1
                self.stats.retries["transient"] += 1
                too_long = exc.retry_after is not None and exc.retry_after > self.cfg.limits.max_retry_after_s
                if transient > self.cfg.limits.max_retries or too_long:
                    if exc.code == "connect" and self.stats.successes == 0:
                        self._fatal(RunFatalError(f"{exc.message}; check endpoint.base_url and the network"))
                        raise Stopped() from None
                    return await self._fail(key, "transient", exc, attempts, paid)
                await asyncio.sleep(self.backoff.delay(transient, exc.retry_after))
                continue
            except PermanentError as exc:
                if self.plan is not None and self.plan.fallback(exc.status, exc.message, exc.code, mode=job.mode):
                    # The structured mode is not supported here: re-shape under the next mode, same row.
                    self.store.set_meta("structured_mode", self.plan.mode)
                    payload, key = self._reshape(job, max_tokens)
                    continue
                return await self._fail(key, "permanent", exc, attempts, paid)

            self._charge(body, job, paid, usage)
            try:
                parsed = parse_completion(body, usage, self.plan)
            except BadContentError as exc:
                bad += 1
                self.stats.retries["bad_content"] += 1
                raise_to = self.cfg.structured.length_max_tokens if self.cfg.structured else None
                if exc.reason == "length":
                    # Same max_tokens would be paid for the same truncation again: only retry if raised.
                    if raise_to and (max_tokens or 0) < raise_to:
                        max_tokens = raise_to
                        payload, _ = self._reshape(job, max_tokens)
                        continue
                    return await self._fail(key, "bad_content", exc, attempts, paid, raw=reply.body)
                budget = self.cfg.structured.bad_content_retries if self.cfg.structured else 1
                if bad > budget:
                    return await self._fail(key, "bad_content", exc, attempts, paid, raw=reply.body)
                continue
            except Exception as exc:  # a parser bug must not lose a paid answer
                log.exception("could not parse the answer for %s", key)
                err = BadContentError(f"could not parse the answer: {type(exc).__name__}: {exc}", reason="parser")
                return await self._fail(key, "bad_content", err, attempts, paid, raw=reply.body)
            record = Record(
                key=key, state="ok", attempts=attempts, status=reply.status, content=parsed.content,
                output_json=_dumps(parsed.output), finish_reason=parsed.finish_reason, model=parsed.model,
                provider=parsed.provider, prompt_tokens=paid[0], completion_tokens=paid[1], cost_usd=paid[2],
                latency_s=reply.latency_s, ttft_s=reply.ttft_s, tool_calls_json=parsed.tool_calls_json,
                logprobs_json=parsed.logprobs_json, raw=reply.body,
            )
            await self._put(record)
            self.stats.successes += 1
            self.limits.on_success()
            if self.cache is not None:
                await self._share(record)
            return record

    async def _share(self, record: Record) -> None:
        """Copy an answer to the cross-run cache, in the cache's per-tick group commit (not one commit each).
        The answer is already safe in this job's store, so a cache that cannot be written only warns."""
        assert self.cache is not None
        try:
            await self.cache.put(dataclasses.replace(record, cache_hit=False, created_at=0.0))
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not add an answer to the cache %s: %s", self.cache.path, exc)

    async def _put(self, record: Record) -> None:
        try:
            await self.store.put(record)
        except (OSError, sqlite3.Error) as exc:
            # Disk full or an I/O error: nothing more can be recorded. Stop; what is committed stays.
            known = diagnosis.explain(exc, os.path.dirname(self.store.path))
            self._fatal(RunFatalError(known[0] if known else f"cannot write to {self.store.path}: {exc}; fix the "
                                      "error, then re-run the same command to resume"))
            raise Stopped() from None

    def _reshape(self, job: Job, max_tokens: int | None) -> tuple[bytes, str]:
        body = dict(job.draft_body)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.plan is not None:
            body = self.plan.shape(body)
            job.mode = self.plan.mode
            job.est_prompt = estimate_prompt_tokens(body, job.image_tokens)
        return finalize(body, self.cfg.endpoint.base_url)

    def _reserve(self, amount: float) -> None:
        cap = self.cfg.budget.max_cost_usd
        if cap is not None and self.spent + self.reserved + amount > cap:
            self._fatal(BudgetExceeded(
                f"budget reached: spent ${self.spent:.4f}, ${self.reserved:.4f} in flight, and the next request "
                f"may cost up to ${amount:.4f}, over budget.max_cost_usd=${cap:g}"
            ))
            raise Stopped()
        self.reserved += amount

    def _fatal(self, exc: RunFatalError) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("stopping: %s", exc)
        self.stop("budget" if isinstance(exc, BudgetExceeded) else "fatal")

    def _usage(self, body: dict[str, Any], job: Job) -> Usage:
        return read_usage(body, self.cfg, job.n_images, est_prompt=job.est_prompt)

    def _charge(self, body: dict[str, Any], job: Job, paid: list[Any], usage: Usage | None = None) -> int:
        """Count a paid attempt (a success, or a failure the provider billed anyway); returns its tokens."""
        usage = usage or self._usage(body, job)
        self.spent += usage.cost_usd
        paid[0] += usage.prompt_tokens
        paid[1] += usage.completion_tokens
        paid[2] += usage.cost_usd
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        self.stats.cost_usd += usage.cost_usd
        return usage.prompt_tokens + usage.completion_tokens

    async def _fail(
        self, key: str, state: str, exc: RequestError, attempts: int, paid: list[Any], raw: bytes | None = None
    ) -> Record:
        record = Record(
            key=key, state=state, attempts=attempts, status=exc.status, error_class=exc.error_class,
            message=_message(exc), content=exc.content, prompt_tokens=paid[0], completion_tokens=paid[1],
            cost_usd=paid[2], raw=raw,
        )
        await self._put(record)
        self.stats.failures[state] += 1
        return record


def _message(exc: RequestError) -> str:
    reason = getattr(exc, "reason", None)
    text = exc.message if not reason else f"{reason}: {exc.message}"
    return text[:1000]


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
