"""Cascades and the audit: which model decides each row, and how often a reference model agrees.

    stage 1 (cheap) -> rows under its min_confidence, or failed there -> stage 2 -> ... -> last stage decides
    decided rows, a seeded share of them -> the audit's reference model -> agreement per field

Each stage is the job asked of another model: its own config (`Config.stage_config`), renderer, structured
plan, request builder and dispatcher, sharing the run's answer store, limiter, transport, budget and
stats. So every stage's answer is stored under its own request key like any answer: a resume (or a kill
-9 in stage 2) finds stage 1's answers in the store and pays for none of them again; identical rows are
sent once; `cache.dir` serves any stage. A row's outcome is a `Decided` record: the deciding stage's
answer with tokens and cost summed over the stages it visited, the stage number, and, for an audited
row, whether the reference model agrees per field (the summary's agreement and the quality gate are
computed from the results, engines/quality.py). A row whose deciding (or audit) answer is not in yet
stays pending, so a stopped batch is redone on resume from the store, never half-decided.

Which rows are audited is a hash of the row id and `quality.audit.seed`: the same rows on every run.

Batch mode (batch/driver.py) sends nothing from here: `needs(batch, lookup)` walks the same stages over
the answers the store holds and names the requests each row needs next, by model (a Batch API file
carries one model): every row's first-stage requests (K of them with votes as requests), then, once those
are collected, the escalated rows' next stage, and so on. The audit's reference model answers a row on
its own, so its requests go with the first stage's instead of costing one more batch window (a row that
ends failed has then paid for an audit answer it does not use). The driver goes round until no row needs
anything; the engine pass then decides every row from the store with this very walk, as in sync mode.

With `prompt.rows_per_request` > 1 every stage packs its rows (core/packing.py): a batch's rows in stage 1,
the rows of that batch going on to stage 2 packed together there, the audited rows at the reference model,
each vote-by-requests sample on its own. A packed row is stored under its own packed key with its share of
its pack's bill and its own confidence (core/pack_confidence.py), so routing, resume, exactly-once and the
cost summed over the stages a row visited work as one by one; only what a request holds differs.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Config
from ..errors import ConfigError, Fatal, Stopped
from ..prepare.packs import Packer, RowBuilder
from ..prepare.prompts import Renderer
from ..prepare.request import RequestBuilder
from ..prepare.structured import StructuredPlan, plan_for
from ..send.confidence import choice_fields, compared_fields, row_confidence, vote_confidence
from ..send.dispatch import Dispatcher
from ..vocab import BuiltBatch, Decided, InputBatch, Record, Request
from .packing import PackSender

if TYPE_CHECKING:
    from .transformer import Core, Outcome

_RECORD_FIELDS = [f.name for f in fields(Record)]


@dataclass(slots=True)
class Stage:
    model: str
    min_confidence: float | None
    renderer: Renderer
    builder: RequestBuilder
    dispatcher: Dispatcher
    # Votes sent as separate requests (quality.vote_by): samples 1..K-1, each the job with its own seed.
    samples: list[tuple[Renderer, RequestBuilder]] = field(default_factory=list)
    # prompt.rows_per_request > 1: the stage's rows go in packs through its dispatcher (core/packing.py).
    packs: PackSender | None = None


@dataclass(slots=True)
class Wanted:
    """Batch mode's walk: answers only from `lookup`; a request it has no answer for is wanted, not sent."""

    lookup: Callable[[Collection[str]], dict[str, Record]]
    requests: dict[str, tuple[str, Request]] = field(default_factory=dict)  # key -> (model, request)


def audited(row_id: str, share: float, seed: int) -> bool:
    """Whether a row is in the audit's sample: a hash of its id, so the same rows on every run."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


class Trust:
    """The cascade's stages and the audit's reference stage of one Core."""

    def __init__(self, core: Core, plan: StructuredPlan | None) -> None:
        self.core = core
        cfg = core.cfg
        cascade = cfg.cascade or []
        if cascade and not choice_fields(plan.schema if plan else None):
            raise ConfigError("a cascade routes rows by the confidence of the answer's enum and boolean fields; "
                              "structured.schema has none (add one, e.g. a label enum)", key="cascade",
                              file=cfg.source)
        first = Stage(cfg.endpoint.model, cascade[0].min_confidence if cascade else None, core.renderer,
                      core.builder, core.dispatcher, packs=core.packs)
        self.stages = [first] + [self._stage(plan, s.model, s.min_confidence) for s in cascade[1:]]
        self.votes = cfg.quality.samples_by_requests(cfg.endpoint.base_url)
        self.closed = choice_fields(plan.schema if plan else None)
        for stage in self.stages if self.votes > 1 else []:
            stage.samples = [self._sample(plan, stage, i) for i in range(1, self.votes)]
        audit = cfg.quality.audit
        self.audit = self._stage(plan, audit.model, None) if audit is not None else None
        self.fields = compared_fields(plan.schema if plan else None)
        everyone = [s.dispatcher for s in self.stages] + ([self.audit.dispatcher] if self.audit else [])
        for d in everyone:
            d.linked = [o for o in everyone if o is not d]
            d.inflight = core.dispatcher.inflight  # an identical request in flight in any stage is sent once

    def _stage(self, plan: StructuredPlan | None, model: str, min_confidence: float | None) -> Stage:
        core = self.core
        for stage in getattr(self, "stages", []):
            if stage.model == model:  # the audit's model is a stage's: the same requests, the same answers
                return Stage(model, min_confidence, stage.renderer, stage.builder, stage.dispatcher,
                             packs=stage.packs)
        if model == core.cfg.endpoint.model:
            return Stage(model, min_confidence, core.renderer, core.builder, core.dispatcher, packs=core.packs)
        cfg: Config = core.cfg.stage_config(model)
        stage_plan = plan_for(cfg, plan.schema) if plan is not None else None
        renderer = core.renderer.for_config(cfg)
        d = core.dispatcher
        packer = Packer.of(cfg, stage_plan, renderer.tokens)
        if packer is None or stage_plan is None:
            builder = RequestBuilder(cfg.endpoint.base_url, stage_plan, renderer.tokens)
            dispatcher = Dispatcher(cfg, d.transport, core.answers, d.limits, stage_plan, stats=core.stats,
                                    budget=d.budget, builder=builder, rng=d.backoff.rng)
            return Stage(model, min_confidence, renderer, builder, dispatcher)
        # Packed like the first stage: rows under their packed keys, packs through this stage's dispatcher.
        packs = PackSender(cfg, packer, core.answers, stage_plan)
        builder = RowBuilder(cfg.endpoint.base_url, stage_plan, renderer.tokens)
        dispatcher = Dispatcher(cfg, d.transport, packs.answers, d.limits, packer.plan, stats=core.stats,
                                budget=d.budget, builder=packer.builder, rng=d.backoff.rng)
        return Stage(model, min_confidence, renderer, builder, dispatcher, packs=packs)

    def _sample(self, plan: StructuredPlan | None, stage: Stage, index: int) -> tuple[Renderer, RequestBuilder]:
        cfg = self.core.cfg.stage_config(stage.model).sample_config(index)
        renderer = stage.renderer.for_config(cfg)
        kind = RowBuilder if stage.packs is not None else RequestBuilder
        return renderer, kind(cfg.endpoint.base_url, stage.builder.plan, renderer.tokens)

    def fatal(self) -> Fatal | None:
        stages = self.stages + ([self.audit] if self.audit else [])
        return next((s.dispatcher.fatal for s in stages if s.dispatcher.fatal is not None), None)

    async def resolve(self, batch: InputBatch) -> tuple[list[Outcome], list[str | None]]:
        """Each row's outcome (None: pending) and the key of the request that decided it."""
        return await self._walk(batch, None)

    async def needs(self, batch: InputBatch, lookup: Callable[[Collection[str]], dict[str, Record]]
                    ) -> tuple[dict[str, tuple[str, Request]], bool]:
        """Batch mode: the requests the rows of `batch` need next given the answers `lookup` finds, as
        {key: (model, request)}, and whether every row is decided already. Nothing is sent."""
        wanted = Wanted(lookup)
        outcomes, _ = await self._walk(batch, wanted)
        if self.audit is not None:
            await self._audit_ahead(batch, outcomes, wanted)
        return wanted.requests, all(o is not None for o in outcomes)

    def pack_senders(self) -> dict[str, PackSender]:
        """Each packing model's pack sender (prompt.rows_per_request > 1: batch mode packs each model's lines)."""
        stages = self.stages + ([self.audit] if self.audit else [])
        return {s.model: s.packs for s in stages if s.packs is not None}

    def lanes(self) -> dict[str, tuple[Config, StructuredPlan | None]]:
        """Each model's config and structured plan (batch mode prices and parses a line by its model)."""
        stages = self.stages + ([self.audit] if self.audit else [])
        return {s.model: (s.dispatcher.cfg, s.dispatcher.plan) for s in stages}

    async def _walk(self, batch: InputBatch, wanted: Wanted | None) -> tuple[list[Outcome], list[str | None]]:
        n = len(batch.rows)
        outcomes: list[Outcome] = [None] * n
        keys: list[str | None] = [None] * n
        visits: list[list[Record]] = [[] for _ in range(n)]
        todo = list(range(n))
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            if not todo:
                break
            built, records = await self._answers(stage, batch, todo, wanted=wanted)
            votes = await self._votes(stage, batch, todo, wanted)
            escalate = []
            for j, i in enumerate(todo):
                key, failure = built.keys[j], built.failures[j]
                if key is None:  # the row cannot become a request for this model
                    if k == last or k == 0:
                        outcomes[i] = _decided(visits[i], k, self.cascaded) if visits[i] else failure
                    else:
                        escalate.append(i)
                    continue
                keys[i] = key
                rec = records.get(key)
                if votes:
                    rec = _voted(rec, [v[j] for v in votes], self.closed)
                if rec is None:
                    continue  # not answered: dispatch stopped; the row stays pending
                visits[i].append(rec)
                if k == last or _sure(rec, stage.min_confidence):
                    outcomes[i] = _decided(visits[i], k, self.cascaded)
                else:
                    escalate.append(i)
            todo = escalate
        if self.audit is not None:
            await self._audit(batch, outcomes, wanted)
        return outcomes, keys

    @property
    def cascaded(self) -> bool:
        return len(self.stages) > 1

    async def _votes(self, stage: Stage, batch: InputBatch, rows: list[int],
                     wanted: Wanted | None) -> list[list[Record | None]]:
        """Per extra sample, each row's answer (None: not in yet); [] when votes are not separate requests."""
        if not stage.samples:
            return []
        answered = [self._answers(stage, batch, rows, sample=s, wanted=wanted) for s in stage.samples]
        out = []
        for built, records in await asyncio.gather(*answered):
            out.append([records.get(k) if k is not None else None for k in built.keys])
        return out

    async def _answers(self, stage: Stage, batch: InputBatch, rows: list[int],
                       sample: tuple[Renderer, RequestBuilder] | None = None,
                       wanted: Wanted | None = None) -> tuple[BuiltBatch, dict[str, Record]]:
        """The stage's requests for `rows` of the batch and their records (from the store, else sent; in
        batch mode's walk, else wanted)."""
        sub = batch if len(rows) == len(batch.rows) else _subset(batch, rows)
        renderer, builder = sample or (stage.renderer, stage.builder)
        built = builder.build_batch(sub, renderer)
        if stage.packs is not None:
            built = Packer.rekey(built)  # a packed row is stored under its own packed key
        if wanted is not None:
            records = wanted.lookup(built.requests.keys())
            for key, req in built.requests.items():
                if key not in records:
                    wanted.requests.setdefault(key, (stage.model, req))
            return built, records
        records = self.core.answers.lookup(built.requests.keys())
        per_key = Counter(k for k in built.keys if k is not None)
        self.core.stats.reused(deduplicated=sum(per_key.values()) - len(per_key))
        todo = [req for key, req in built.requests.items() if key not in records]
        if not todo:
            return built, records
        if stage.packs is not None:  # the stage's rows (or the sample's) packed together
            records.update(await self._packed(stage, stage.packs, todo))
            return built, records
        tasks = [asyncio.create_task(stage.dispatcher.submit(req)) for req in todo]
        self.core.track(tasks)
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.core.untrack(tasks)
        for req, res in zip(todo, results):
            if isinstance(res, Record):
                records[req.key] = res
            elif not isinstance(res, (Stopped, asyncio.CancelledError)):
                raise res  # a bug, not an outcome: surface it
        return built, records

    async def _packed(self, stage: Stage, packs: PackSender, todo: list[Request]) -> dict[str, Record]:
        """The rows' records, sent in packs; rows left when dispatch stops have none (they stay pending)."""
        records: dict[str, Record] = {}
        task = asyncio.create_task(packs.send(stage.dispatcher, todo, records.__setitem__))
        self.core.track([task])  # abort() cancels the packs in flight; what they resolved stays
        try:
            (res,) = await asyncio.gather(task, return_exceptions=True)
        finally:
            self.core.untrack([task])
        if isinstance(res, BaseException) and not isinstance(res, (Stopped, asyncio.CancelledError)):
            raise res  # a bug, not an outcome: surface it
        return records

    async def _audit(self, batch: InputBatch, outcomes: list[Outcome], wanted: Wanted | None = None) -> None:
        """The audited rows' answers from the reference model, compared field by field."""
        audit, cfg = self.audit, self.core.cfg.quality.audit
        assert audit is not None and cfg is not None
        rows = [i for i, o in enumerate(outcomes) if isinstance(o, Decided) and o.state == "ok"
                and audited(batch.ids[i], cfg.share, cfg.seed)]
        if not rows:
            return
        built, records = await self._answers(audit, batch, rows, wanted=wanted)
        for j, i in enumerate(rows):
            key = built.keys[j]
            ref = records.get(key) if key is not None else None
            row = outcomes[i]
            assert isinstance(row, Decided)
            if key is not None and ref is None:
                outcomes[i] = None  # the reference answer is not in yet: decided on resume, with it
            elif ref is not None and ref.state == "ok":
                row.audit_json = orjson.dumps(_agreement(row, ref, self.fields)).decode()

    async def _audit_ahead(self, batch: InputBatch, outcomes: list[Outcome], wanted: Wanted) -> None:
        """Batch mode: the audited rows' reference requests without waiting for their decision (the rows
        decided as failures, which the audit leaves out, excepted)."""
        audit, cfg = self.audit, self.core.cfg.quality.audit
        assert audit is not None and cfg is not None
        rows = [i for i, o in enumerate(outcomes) if (o is None or isinstance(o, Record) and o.state == "ok")
                and audited(batch.ids[i], cfg.share, cfg.seed)]
        if not rows:
            return
        await self._answers(audit, batch, rows, wanted=wanted)  # names the reference requests not answered yet


def _voted(first: Record | None, others: list[Record | None], closed: dict[str, list[Any]]) -> Record | None:
    """K answers to the same row as one: the sample agreeing with most per-field majorities, each field's
    confidence its share of the K votes, tokens and cost summed over all K (None until all K are in)."""
    if first is None or any(o is None for o in others):
        return None
    every = [first, *[o for o in others if o is not None]]
    outputs = [orjson.loads(r.output_json) if r.state == "ok" and r.output_json else None for r in every]
    shares: dict[str, float | None] = {}
    if all(o is None for o in outputs):
        chosen = first
    else:
        index, shares = vote_confidence(outputs, closed)
        chosen = every[index]
    known = {k: v for k, v in shares.items() if v is not None}
    return replace(chosen, cost_usd=sum(r.cost_usd for r in every), prompt_tokens=sum(r.prompt_tokens for r in every),
                   completion_tokens=sum(r.completion_tokens for r in every),
                   confidence=row_confidence(known) if known else None,
                   confidence_json=orjson.dumps(known).decode() if known else None)


def _sure(rec: Record, min_confidence: float | None) -> bool:
    return rec.state == "ok" and rec.confidence is not None and min_confidence is not None \
        and rec.confidence >= min_confidence


def _decided(visits: list[Record], stage: int, cascaded: bool) -> Decided:
    last = visits[-1]
    row = Decided(**{name: getattr(last, name) for name in _RECORD_FIELDS})
    row.cost_usd = sum(r.cost_usd for r in visits)
    row.prompt_tokens = sum(r.prompt_tokens for r in visits)
    row.completion_tokens = sum(r.completion_tokens for r in visits)
    row.cascade_stage = stage + 1 if cascaded else None
    return row


def _agreement(row: Record, ref: Record, names: list[str]) -> dict[str, bool]:
    mine = orjson.loads(row.output_json) if row.output_json else None
    theirs = orjson.loads(ref.output_json) if ref.output_json else None
    if names == ["output"] or not isinstance(mine, dict) or not isinstance(theirs, dict):
        return {name: mine == theirs for name in names}
    return {name: mine.get(name) == theirs.get(name) for name in names}


def _subset(batch: InputBatch, rows: list[int]) -> InputBatch:
    return InputBatch(batch.index, [batch.rows[i] for i in rows], [batch.ids[i] for i in rows],
                      [batch.origins[i] for i in rows], [batch.errors[i] for i in rows],
                      batch.carried.take(rows))
