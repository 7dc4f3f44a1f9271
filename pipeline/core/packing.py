"""Packs on the wire (`prompt.rows_per_request` > 1): one dispatcher request per pack, its answer split
into its rows' own records.

    sender = PackSender(cfg, packer, answers, row_plan)   # Core wires it: the dispatcher writes to
    dispatcher = Dispatcher(..., sender.answers, ...)     # sender.answers, packs are its requests
    records = await sender.send(dispatcher, todo, on_record)   # {row key: Record}, as one by one

A pack is an ordinary request to the dispatcher: limits, budget, the one classifier, transient retries,
structured-mode fallback and `max_tokens` reshapes all apply to it as a whole. What it commits reaches
the answer store only through `PackAnswers.put`, which turns the pack's record into one record per row
(under the row's own key, with its share of the tokens and cost) and commits them together (the store
groups the puts of one event-loop tick into one transaction): a kill -9 leaves all of a pack's rows
stored or none. A pack's record itself is never stored.

Each row's record carries its own confidence (`quality.confidence`) and its own logprobs, measured on its
own part of the pack's answer (core/pack_confidence.py); with votes over n samples, its majority answer.

Rows asked again: a row the answer leaves without a usable answer (missing, repeated with different
answers, invalid, or only under an id the pack did not ask) is committed as `transient` with its share
of the cost (a resume asks it again; the next record for it carries that cost forward), then asked again
alone. A pack of several rows that fails as a whole (bad content after its retries, or a permanent error
that may be one row's fault) also sends its rows again alone. A row alone that answers badly uses the
bad-content budget (`structured.bad_content_retries`), then is recorded as `bad_content`. A pack whose
transient retries ran out records every row as `transient`, as one-by-one does.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import orjson

from ..config import Config
from ..errors import RunFatalError, Stopped
from ..models.prices import find_price
from ..prepare.packs import Pack, Packer, Share, apportion, split_answer
from ..prepare.packs import shares as divide
from ..prepare.structured import StructuredPlan
from ..send.confidence import choice_fields
from ..send.dispatch import Dispatcher
from ..vocab import AnswerStore, Record, Request
from .pack_confidence import Measured, Measuring, measure


@dataclass(slots=True)
class _Spent:
    """What a row has cost before its current pack (its stored record holds it; the next one adds to it)."""

    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    bad: int = 0  # answers alone that were unusable

    @classmethod
    def of(cls, rec: Record, bad: int) -> _Spent:
        return cls(rec.attempts or 0, rec.prompt_tokens, rec.completion_tokens, rec.cost_usd, rec.cached_tokens,
                   rec.cache_write_tokens, bad)


@dataclass(slots=True)
class _Flight:
    pack: Pack
    spent: dict[str, _Spent]
    records: dict[str, Record] = field(default_factory=dict)  # the last record committed per row


class PackAnswers:
    """The answer store the pack dispatcher writes to: a pack's record becomes its rows' records."""

    def __init__(self, inner: AnswerStore, row_plan: StructuredPlan, price: tuple[float, float] | None,
                 measuring: Measuring | None = None) -> None:
        self.inner, self.row_plan, self.price = inner, row_plan, price
        self.measuring = measuring  # each row's confidence and own logprobs (core/pack_confidence.py)
        self.flights: dict[str, _Flight] = {}

    def lookup(self, keys: Collection[str]) -> dict[str, Record]:
        return self.inner.lookup(keys)

    def note(self, name: str, value: str) -> None:
        self.inner.note(name, value)

    async def put(self, record: Record) -> None:
        flight = self.flights.get(record.key)
        if flight is None:  # not a pack's (nothing else is sent through this dispatcher)
            await self.inner.put(record)
            return
        rows = self.rows(flight, record)
        flight.records.update((r.key, r) for r in rows)
        # One tick: the store commits a pack's rows in one transaction.
        await asyncio.gather(*(self.inner.put(r) for r in rows))

    def rows(self, flight: _Flight, record: Record) -> list[Record]:
        """The pack's record as one record per row, each with its share of the pack's bill."""
        pack = flight.pack
        split = split_answer(orjson.loads(record.output_json or "null"), pack, self.row_plan) \
            if record.state == "ok" else None
        measured = measure(record, pack, split, self.measuring) if split is not None and self.measuring else {}
        billed = Share(record.prompt_tokens, record.completion_tokens, record.cost_usd)
        shares = apportion(pack, billed, split.answer_chars if split else {}, len(record.content or ""), self.price)
        # Cached and cache-written tokens are the shared prefix's: evenly.
        even = [1.0] * len(pack.rows)
        cached, written = divide(record.cached_tokens, even), divide(record.cache_write_tokens, even)
        out = []
        for row, share, hit, wrote in zip(pack.rows, shares, cached, written):
            spent = flight.spent[row.key]
            rec = Record(key=row.key, state="transient", attempts=spent.attempts + record.attempts,
                         status=record.status, prompt_tokens=spent.prompt_tokens + share.prompt_tokens,
                         completion_tokens=spent.completion_tokens + share.completion_tokens,
                         cost_usd=spent.cost_usd + share.cost_usd, model=record.model, provider=record.provider,
                         latency_s=record.latency_s, ttft_s=record.ttft_s, finish_reason=record.finish_reason,
                         cached_tokens=spent.cached_tokens + hit, cache_write_tokens=spent.cache_write_tokens + wrote,
                         usage_note=record.usage_note)
            if split is not None and row.key in split.answers:
                text = orjson.dumps(split.answers[row.key]).decode()
                m = measured.get(row.key) or Measured()
                rec = replace(rec, state="ok", content=text, output_json=text, raw=text.encode(),
                              confidence=m.confidence, confidence_json=m.confidence_json, logprobs_json=m.logprobs_json)
            elif split is not None:
                rec = replace(rec, error_class="bad_content", message=split.bad[row.key][:1000])
            else:
                # A pack of several rows that failed is asked again row by row: "transient" until then.
                alone = len(pack.rows) == 1
                rec = replace(rec, state=record.state if alone else "transient", error_class=record.error_class,
                              message=record.message, content=record.content, raw=record.raw if alone else None)
            out.append(rec)
        return out


class PackSender:
    """Sends rows in packs through one dispatcher and resolves each row to its final record."""

    def __init__(self, cfg: Config, packer: Packer, answers: AnswerStore, row_plan: StructuredPlan) -> None:
        price = find_price(cfg, cfg.endpoint.model, batch=cfg.run.mode == "batch")
        self.packer = packer
        measuring = Measuring(cfg.quality.confidence, choice_fields(row_plan.schema), packer.plan, row_plan)
        self.answers = PackAnswers(answers, row_plan,
                                   (price.input_per_m, price.output_per_m) if price is not None else None, measuring)
        self.bad_retries = cfg.structured.bad_content_retries if cfg.structured is not None else 1
        self.spent: dict[str, _Spent] = {}
        self.flying_rows: dict[str, asyncio.Future[Record]] = {}  # rows in a pack now, by key

    def settle(self, pack: Pack, record: Record, *, answered_alone: int = 0) -> tuple[list[Record], Settled]:
        """A pack's record that reached us without the dispatcher (a batch line's, batch/packed.py): the rows'
        records to commit together (never the pack's own), and what became of each row, decided as a pack
        sent here is. `answered_alone`: for a pack of one row, how many earlier answers of that same pack
        left the row without a usable answer (batch mode counts them in its ledger, across runs)."""
        spent = {r.key: self.spent.pop(r.key, _Spent()) for r in pack.rows}
        if len(pack.rows) == 1:
            one = spent[pack.rows[0].key]
            one.bad = max(one.bad, answered_alone)
        flight = _Flight(pack, spent)
        rows = self.answers.rows(flight, record)
        flight.records.update((r.key, r) for r in rows)
        settled = settle(flight, record, self.bad_retries)
        self.spent.update(settled.again)
        return [*rows, *settled.give_up], settled

    async def send(self, dispatcher: Dispatcher, todo: list[Request],
                   on_record: Callable[[str, Record], None]) -> None:
        """Every row of `todo` to its final record, each handed to `on_record` as it is resolved; rows
        left when dispatch stops are never handed (they stay pending). A row already in a pack of another
        batch's is not packed again: it takes that pack's record (a row is never in two packs at once)."""
        loop = asyncio.get_running_loop()
        joined = [(r.key, self.flying_rows[r.key]) for r in todo if r.key in self.flying_rows]
        mine = [r for r in todo if r.key not in self.flying_rows]
        for req in mine:
            self.flying_rows[req.key] = loop.create_future()

        def resolved(key: str, rec: Record) -> None:
            fut = self.flying_rows.get(key)
            if fut is not None and not fut.done():
                fut.set_result(rec)
            on_record(key, rec)

        try:
            await self._packs(dispatcher, mine, resolved)
        finally:
            for req in mine:
                fut = self.flying_rows.pop(req.key)
                if not fut.done():
                    fut.cancel()  # stopped or aborted: whoever joined it leaves the row pending too
        waits = await asyncio.gather(*(asyncio.shield(fut) for _, fut in joined), return_exceptions=True)
        for (key, _), rec in zip(joined, waits):
            if isinstance(rec, Record):
                on_record(key, rec)

    async def _packs(self, dispatcher: Dispatcher, todo: list[Request],
                     on_record: Callable[[str, Record], None]) -> None:
        flying: set[asyncio.Task[tuple[dict[str, Record], list[Request]]]] = set()

        def launch(rows: list[Request], size: int | None) -> None:
            for pack in self.packer.packs(rows, size):
                flying.add(asyncio.create_task(self._fly(dispatcher, pack)))

        launch(todo, None)
        try:
            while flying:
                done, flying = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled() or isinstance(task.exception(), Stopped):
                        continue  # its rows stay pending
                    final, again = task.result()
                    for key, rec in final.items():
                        on_record(key, rec)
                    if again:
                        launch(again, 1)
        finally:
            for task in flying:
                task.cancel()
            if flying:
                await asyncio.gather(*flying, return_exceptions=True)

    async def _fly(self, dispatcher: Dispatcher, pack: Pack) -> tuple[dict[str, Record], list[Request]]:
        """One pack to its end: the rows it resolved, and the rows to ask again alone."""
        assert pack.request is not None  # built by the packer (only the batch ledger rebuilds packs)
        flight = _Flight(pack, {r.key: self.spent.pop(r.key, _Spent()) for r in pack.rows})
        key = pack.request.key
        self.answers.flights[key] = flight
        try:
            record = await dispatcher.submit(pack.request)
        finally:
            self.answers.flights.pop(key, None)
        settled = settle(flight, record, self.bad_retries)
        for rec in settled.give_up:
            await _commit(dispatcher, self.answers.inner, rec)
        self.spent.update(settled.again)
        return settled.final, [row.request for row in pack.rows if row.key in settled.again and row.request is not None]


@dataclass(slots=True)
class Settled:
    """What a pack's answer did for its rows (sync packs and batch lines decide alike)."""

    final: dict[str, Record] = field(default_factory=dict)  # rows resolved, by key (their records committed)
    give_up: list[Record] = field(default_factory=list)  # rows alone out of bad-content budget: commit these
    again: dict[str, _Spent] = field(default_factory=dict)  # rows to ask again alone, with what they cost so far


def settle(flight: _Flight, record: Record, bad_retries: int) -> Settled:
    """After a pack's record became its rows' records (`flight.records`): the rows it resolved, and the rows
    to ask again alone (a row without a usable answer in a pack of several; a pack of several that failed
    as a whole, except when its transient retries ran out; a row alone within its bad-content budget)."""
    alone = len(flight.pack.rows) == 1
    out = Settled()
    for row in flight.pack.rows:
        rec = flight.records.get(row.key)
        if rec is None:  # nothing was committed for it (cannot happen once the pack's record is)
            continue
        if rec.state == "ok" or (record.state != "ok" and (alone or record.state == "transient")):
            out.final[row.key] = rec
            continue
        bad = flight.spent[row.key].bad + (1 if alone and record.state == "ok" else 0)
        if alone and bad > bad_retries:
            rec = replace(rec, state="bad_content")
            out.give_up.append(rec)
            out.final[row.key] = rec
        else:
            out.again[row.key] = _Spent.of(rec, bad)
    return out


async def _commit(dispatcher: Dispatcher, answers: AnswerStore, record: Record) -> None:
    try:
        await answers.put(record)
    except RunFatalError as exc:  # nothing more can be stored: stop as the dispatcher does
        if dispatcher.fatal is None:
            dispatcher.fatal = exc
        dispatcher.stop("fatal")
        raise Stopped() from exc
