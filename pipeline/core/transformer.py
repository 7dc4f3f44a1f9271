"""The engine as a transformer: input batches in, outcome batches out.

`Core.outcomes(batches)` takes `vocab.InputBatch`es (an iterable or an async iterable) and yields
one `OutcomeBatch` per input batch, as each one is resolved (not necessarily in input order): per row
a `Record` (an answer or a failed request, with its request key, tokens and cost), a `RowFailure` (the
row never became a request), or None (not answered because dispatch stopped: the row is pending).
Rows are built into requests (prepare/request.py), answered from the answer store when it already has
them, else sent through the limiter, the transport and the one classifier (send/dispatch.py).

The core owns no files, no store and no signals. A driver injects:

    answers    vocab.AnswerStore         lookup(keys) -> {key: Record} to reuse (answers, and failures
                                         not to ask again); async put(record), durable when it returns
                                         (RunFatalError when nothing can be stored: the run stops);
                                         note(name, value) (e.g. the structured mode learned, for the
                                         next run)   -> state.answers.LocalAnswers
    limiter    send.limits.Limiter       slot(est_tokens) (an async context giving a Permit with
                                         settle(tokens) and sent_at), observe(headers), pause(s),
                                         decrease(sent_at), on_success(), stop()  -> send.limits.Limits
    transport  send.transport.Transport  async send(payload, stream=) -> Reply; async close() (the
                                         driver closes it)   -> send.transport.HttpTransport
    progress   ProgressSink (optional)   advance(rows, stats, failed): rows resolved so far, as they are
    budget     send.budget.Budget        (optional) the spend cap; by default budget.max_cost_usd with
                                         `spent_before` already spent (a resumed job's earlier cost)

and decides where the outcomes go (the local runner: Parquet parts and the SQLite store's part
index; another driver: its own sink). Stopping: `stop(reason)` stops dispatch (requests in flight
finish; nothing new is sent, rows not reached stay pending); `abort()` also cancels the requests in
flight (their rows stay pending; answers already received are committed). After the last batch,
`stop_reason` / `fatal` say whether and why dispatch stopped, and `stats` holds the run's counters.

Driving it (a complete local driver is engines/runner.py):

    core = Core(cfg, renderer, plan, answers=my_answers, limiter=Limits(cfg.limits),
                transport=HttpTransport(base_url, api_key))
    async with contextlib.aclosing(core.outcomes(source.batches())) as stream:
        async for out in stream:
            results, failures = out.tables(columns)   # Arrow tables, as the local part files hold
            ...                                        # write them; out.complete: no row pending
    if core.fatal is not None:
        print("stopped:", core.fatal, core.fatal.hint)
"""
from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

import pyarrow as pa

from ..config import Config
from ..errors import BudgetExceeded, Fatal, Stopped
from ..prepare.packs import Packer, RowBuilder
from ..prepare.prompts import Renderer
from ..prepare.request import RequestBuilder
from ..prepare.structured import StructuredPlan
from ..send.budget import Budget
from ..send.dispatch import Dispatcher
from ..send.limits import Limiter
from ..send.stats import Stats
from ..send.transport import Transport
from ..vocab import AnswerStore, InputBatch, Record, Request, RowFailure
from ..write.output import OutputColumns, part_tables
from .packing import PackSender

log = logging.getLogger("pipeline")

if TYPE_CHECKING:
    from .cascade import Trust

# Unfinished batches held at once: enough to keep every concurrency slot busy while a straggler retries.
MAX_OPEN_BATCHES = 4

Outcome = Record | RowFailure | None


class ProgressSink(Protocol):
    def advance(self, rows: int, stats: Stats, failed: int) -> None:
        """`rows` more rows are resolved; `failed` is the total failed so far."""
        ...


@dataclass(slots=True)
class OutcomeBatch:
    """What became of one input batch's rows, in the batch's row order."""

    batch: InputBatch
    outcomes: list[Outcome]
    keys: list[str | None]  # each row's request key (None: the row never became a request)

    @property
    def index(self) -> int:
        return self.batch.index

    @property
    def complete(self) -> bool:
        """Every row is resolved (answered or failed); False when dispatch stopped before some."""
        return all(o is not None for o in self.outcomes)

    def tables(self, columns: OutputColumns) -> tuple[pa.Table, pa.Table]:
        """The results and failures rows (the carried input columns joined), as Arrow tables."""
        return part_tables(columns, self.batch.carried, self.outcomes)


class CoreExtras(TypedDict, total=False):
    """The optional collaborators of a Core (see the module docstring)."""

    progress: ProgressSink | None
    stats: Stats | None
    budget: Budget | None  # default: budget.max_cost_usd with nothing spent before
    rng: random.Random | None


class Core:
    def __init__(self, cfg: Config, renderer: Renderer, plan: StructuredPlan | None, *, answers: AnswerStore,
                 limiter: Limiter, transport: Transport, **extras: Unpack[CoreExtras]) -> None:
        self.cfg, self.renderer, self.answers, self.progress = cfg, renderer, answers, extras.get("progress")
        self.stats = extras.get("stats") or Stats()
        budget = extras.get("budget") or Budget(cfg.budget.max_cost_usd)
        rng = extras.get("rng")
        # prompt.rows_per_request > 1: the dispatcher sends packs, and writes their rows through the sender.
        packer = Packer.of(cfg, plan, renderer.tokens)
        self.packs = PackSender(cfg, packer, answers, plan) if packer is not None and plan is not None else None
        self.builder = (RequestBuilder if self.packs is None else RowBuilder)(cfg.endpoint.base_url, plan,
                                                                               renderer.tokens)
        if self.packs is None:
            self.dispatcher = Dispatcher(cfg, transport, answers, limiter, plan, stats=self.stats, budget=budget,
                                         builder=self.builder, rng=rng)
        else:
            self.dispatcher = Dispatcher(cfg, transport, self.packs.answers, limiter, self.packs.packer.plan,
                                         stats=self.stats, budget=budget, builder=self.packs.packer.builder, rng=rng)
        self.window = max(MAX_OPEN_BATCHES, -(-cfg.limits.max_concurrency * 2 // (cfg.input.batch_size or 1)))
        self.failed_rows = 0
        self._requests: set[asyncio.Task[Any]] = set()
        self.trust: Trust | None = None
        if cfg.cascade or cfg.quality.audit or cfg.quality.samples_by_requests(cfg.endpoint.base_url) > 1:
            # Stages answered in turn, the audit, votes as separate requests (core/cascade.py).
            from .cascade import Trust
            self.trust = Trust(self, plan)

    @property
    def stop_reason(self) -> str | None:
        return self.dispatcher.stop_reason

    @property
    def fatal(self) -> Fatal | None:
        if self.dispatcher.fatal is None and self.trust is not None:
            return self.trust.fatal()
        return self.dispatcher.fatal

    def track(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Requests in flight that abort() cancels."""
        self._requests.update(tasks)

    def untrack(self, tasks: list[asyncio.Task[Any]]) -> None:
        self._requests.difference_update(tasks)

    @property
    def plan(self) -> StructuredPlan | None:
        """The structured plan requests are shaped for (its mode may step down during the run)."""
        return self.dispatcher.plan

    @property
    def budget(self) -> Budget:
        return self.dispatcher.budget

    def charge(self, cost_usd: float) -> None:
        """Count money spent outside the dispatcher (a Batch API line) against the run's budget."""
        self.dispatcher.budget.charge(cost_usd)

    def stop(self, reason: str = "interrupted") -> None:
        self.dispatcher.stop(reason)

    def fail_run(self, exc: Fatal) -> None:
        """Stop the run for a run-fatal reason found outside the dispatcher (batch mode), as it would."""
        reason = "budget" if isinstance(exc, BudgetExceeded) else "fatal"
        if self.dispatcher.fatal is None:
            self.dispatcher.fatal = exc
            log.error("stopping: %s", exc, extra={"event": "stop", "reason": reason})
        self.stop(reason)

    def abort(self) -> None:
        """Cancel the requests in flight now (after stop): their rows stay pending."""
        for task in list(self._requests):
            task.cancel()

    async def outcomes(self, batches: Iterable[InputBatch] | AsyncIterable[InputBatch]
                       ) -> AsyncGenerator[OutcomeBatch, None]:
        """One OutcomeBatch per input batch read, as each is resolved; reading stops when dispatch does."""
        source = _aiter(batches)
        pending: set[asyncio.Task[OutcomeBatch]] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.window and not self.stop_reason:
                    batch = await anext(source, None)
                    if batch is None:
                        exhausted = True
                        break
                    pending.add(asyncio.create_task(self._resolve(batch)))
                    await asyncio.sleep(0)  # let the batch build and dispatch before reading the next one
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _resolve(self, batch: InputBatch) -> OutcomeBatch:
        if self.trust is not None:
            decided, keys = await self.trust.resolve(batch)
            done = [o for o in decided if o is not None]
            self._rows_done(len(done), sum(1 for o in done if not (isinstance(o, Record) and o.state == "ok")))
            return OutcomeBatch(batch, decided, keys)
        built = self.builder.build_batch(batch, self.renderer)
        if self.packs is not None:
            built = Packer.rekey(built)  # a packed row is stored under its own packed key
        outcomes: list[Outcome] = list(built.failures)
        records = self.answers.lookup(built.requests.keys())
        rows_per_key = Counter(k for k in built.keys if k is not None)
        self.stats.reused(deduplicated=sum(rows_per_key.values()) - len(rows_per_key))
        input_failed = sum(1 for o in outcomes if o is not None)
        self._rows_done(input_failed + sum(rows_per_key[k] for k in records),
                        input_failed + sum(rows_per_key[k] for k, r in records.items() if r.state != "ok"))
        todo = [req for key, req in built.requests.items() if key not in records]
        if todo:
            records.update(await self._send(todo, rows_per_key))
        for i, key in enumerate(built.keys):
            if key is not None and key in records:
                outcomes[i] = records[key]
        return OutcomeBatch(batch, outcomes, built.keys)

    async def _send(self, todo: list[Request], rows_per_key: Counter[str]) -> dict[str, Record]:
        if self.packs is not None:
            return await self._send_packs(self.packs, todo, rows_per_key)
        tasks = [asyncio.create_task(self.dispatcher.submit(req)) for req in todo]
        for req, task in zip(todo, tasks):
            task.add_done_callback(functools.partial(self._answered, rows_per_key[req.key]))
        self._requests.update(tasks)
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._requests.difference_update(tasks)
        records: dict[str, Record] = {}
        for req, res in zip(todo, results):
            if isinstance(res, Record):
                records[req.key] = res
            elif not isinstance(res, (Stopped, asyncio.CancelledError)):
                raise res  # a bug, not an outcome: surface it
        return records

    async def _send_packs(self, packs: PackSender, todo: list[Request],
                          rows_per_key: Counter[str]) -> dict[str, Record]:
        records: dict[str, Record] = {}

        def done(key: str, record: Record) -> None:
            records[key] = record
            rows = rows_per_key[key]
            self._rows_done(rows, rows if record.state != "ok" else 0)

        task = asyncio.create_task(packs.send(self.dispatcher, todo, done))
        self._requests.add(task)  # abort() cancels the packs in flight with it; what they resolved stays
        try:
            (res,) = await asyncio.gather(task, return_exceptions=True)
        finally:
            self._requests.discard(task)
        if isinstance(res, BaseException) and not isinstance(res, (Stopped, asyncio.CancelledError)):
            raise res  # a bug, not an outcome: surface it
        return records

    def _answered(self, rows: int, task: asyncio.Task[Record]) -> None:
        """The bar moves as answers arrive, not when a whole batch is resolved."""
        if not task.cancelled() and task.exception() is None:
            self._rows_done(rows, rows if task.result().state != "ok" else 0)

    def _rows_done(self, rows: int, failed: int) -> None:
        if rows:
            self.failed_rows += failed
            if self.progress is not None:
                self.progress.advance(rows, self.stats, self.failed_rows)


async def _aiter(batches: Iterable[InputBatch] | AsyncIterable[InputBatch]) -> AsyncIterator[InputBatch]:
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            yield batch
    else:
        for batch in batches:
            yield batch
