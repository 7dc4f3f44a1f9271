"""run.mode: batch — fill the job's answer store through the provider's Batch API.

One pass of `run_batches` per `pipeline run`, in this order, so that a run killed at any instant is
resumed by running the same command again:
  1. reconcile (reconcile.py): before anything is submitted, every intent the ledger holds is settled
     against the provider (a file uploaded but not recorded is adopted by its name where the server
     lists files, else uploaded again; a batch created but not recorded is adopted by its metadata: job
     id + chunk number), and a file killed while being written is dropped;
  2. collect (poll.py): poll the batches at the provider; a finished one's output and error files are downloaded
     (resuming a partial download) and every line is committed to the store (collect.py) before the
     chunk counts as collected; then its files at the provider are deleted (batch.delete_files);
  3. submit (submit.py): the requests the store cannot answer are rendered by the very builder the sync
     mode uses (same body, same request key; with prompt.rows_per_request > 1 the same packs, packed.py),
     streamed into files within the caps, uploaded and created,
     each step behind an intent recorded (and fsynced) first; the queue cap (batch.max_enqueued_tokens)
     and the budget (each line at its worst case until collected) are checked before each create. With a
     cascade, an audit or votes as requests, what a row needs depends on the answers collected so far:
     after each collection the rows it touched are asked again what they need next (rounds.py), so a
     cascade's later stage goes out as soon as the stage before has answered, in files of its own model;
  4. wait (poll_interval_s, backing off with jitter to poll_max_interval_s; after a failed call, the
     retry backoff of calls.py) and go round again, until nothing is in flight and nothing is left to send.
Then the ordinary engine writes results/failures/summary from the store, with nothing left to send,
so the outputs are exactly those of a sync run. Ctrl-C, a run-fatal error or `--no-wait` (once every
file is submitted and a batch is running) leave the batches running at the provider; the next run
collects them.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..core.context import RunOptions
from ..core.packing import PackSender
from ..core.transformer import Core
from ..errors import Fatal, RequestError, RunFatalError
from ..send.retry import Backoff
from ..send.transport import HttpTransport
from ..state.store import Store
from ..vocab import InputBatch, Record, Request
from .calls import Calls, describe
from .client import TERMINAL, BatchClient
from .collect import Collector, worst_line_cost
from .files import ChunkWriter
from .ledger import LIVE, Chunk, Ledger
from .packed import BatchPacks
from .poll import Poller
from .progress import BatchBar
from .reconcile import Reconciler
from .rounds import Rounds
from .submit import Submitter

if TYPE_CHECKING:
    from ..prepare.structured import StructuredPlan

Lookup = Callable[[Collection[str]], dict[str, Record]]
# Cascades, the audit and votes as requests (core/cascade.py `Trust.needs`): the requests the rows of a batch
# need next given the answers a lookup finds, {key: (model, request)}, and whether every row is decided.
Route = Callable[[InputBatch, Lookup], Awaitable[tuple[dict[str, tuple[str, Request]], bool]]]

log = logging.getLogger("pipeline")

# Tests inject failures here: called with the step's name ("writing", "uploaded", "created", "polling",
# "downloading") at the moment a kill at that step would hurt most. None in production.
FAULT_HOOK: Callable[[str], None] | None = None
# How the driver waits between rounds: tests put a virtual clock here (nothing sleeps for real).
NAP: Callable[[float], Awaitable[Any]] = asyncio.sleep

@dataclass
class Engine:
    """What the driver uses of the run: the core (its builder, stats, budget and stop), the job's store,
    and the same request building and answer lookup as the sync mode."""

    core: Core
    store: Store
    build: Callable[[InputBatch], dict[str, Request]]
    known: Lookup
    observe: Callable[[int | None, str | None], None] | None = None  # each line's status: the run's tally
    route: Route | None = None
    lanes: dict[str, tuple[Config, StructuredPlan | None]] = field(default_factory=dict)  # per model (Trust.lanes)
    senders: dict[str, PackSender] = field(default_factory=dict)  # per packing model (Trust.pack_senders)

    def lane(self, model: str | None) -> tuple[Config, StructuredPlan | None]:
        """The config (prices) and structured plan (parsing) of a file's model; None: the job's own."""
        return self.lanes[model] if model in self.lanes else (self.core.cfg, self.core.plan)

    def stop(self, exc: Fatal) -> None:
        """Stop the run for a run-fatal reason, as the dispatcher does."""
        self.core.fail_run(exc)

    @property
    def stop_reason(self) -> str | None:
        return self.core.stop_reason


class BatchDriver:
    def __init__(self, cfg: Config, folder: str, engine: Engine, transport: HttpTransport, *,
                 batches: Callable[[], Iterable[InputBatch]], options: RunOptions, progress: bool = False,
                 rng: random.Random | None = None) -> None:
        """`options` are the invocation's flags (--no-wait, --force-new), as the run context carries them."""
        self.cfg, self.folder, self.engine = cfg, folder, engine
        self.plan = engine.core.plan
        self.store = engine.store
        self.ledger = Ledger(self.store)
        self.client = BatchClient(transport)
        sender = engine.core.packs
        self.packs = BatchPacks(sender, self.ledger) if sender is not None else None  # a line per pack
        # A cascade with packs: each model's lines are its own stage's packs (rounds.py, collect.py).
        self.lane_packs = {model: BatchPacks(s, self.ledger) for model, s in engine.senders.items()}
        self.collector = Collector(cfg, self.ledger, engine, self.plan, packs=self.packs, lane_packs=self.lane_packs)
        self.batches = batches
        self.no_wait, self.rng = options.no_wait, rng or random.Random()
        self.calls = Calls(cfg, Backoff(cfg.limits.backoff_base_s, cfg.limits.backoff_max_s, self.rng))
        self.reconciler = Reconciler(self.ledger, self.client, self.calls, self.filename, force_new=options.force_new)
        self.poller = Poller(self)  # 2. collect
        self.submitter = Submitter(self)  # 3. submit
        self.writer = ChunkWriter(self.ledger, folder, cfg.batch, before_line=self.at)
        self.writers: dict[str, ChunkWriter] = {}  # a cascade's other models' files (one model a file)
        self.rounds = Rounds(self) if engine.route is not None else None
        self.settled: set[str] = set()  # failures recorded by this run: not sent again by it
        self.to_sync: set[str] = set()  # batch.retry_via: sync — left for the engine's sync pass
        self.rerender = False  # packs: rows to ask alone wait for the next render of the input
        self.bar = BatchBar(enabled=progress)

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> str:
        """'collected' (the store answers every request), 'waiting' (--no-wait: batches are running) or
        'stopped' (run-fatal, budget or Ctrl-C: what is done is kept, the batches keep running)."""
        render = True
        wait = self.cfg.batch.poll_interval_s
        try:
            while True:
                await self.reconcile()
                modes = self._modes()
                moved = await self.poller.collect() if not self.engine.stop_reason else False
                if self._modes() != modes:
                    render = True  # a structured-mode fallback: every request is shaped anew
                    if self.rounds is not None:
                        self.rounds.everything()
                if self.engine.stop_reason:
                    return "stopped"
                if render or self.rerender or (self.rounds is not None and self.rounds.due):
                    self.rerender = False
                    await self.write_pending()
                    render = False
                if not self.engine.stop_reason:
                    await self.submitter.submit()
                await self.poller.cleanup()
                if self.engine.stop_reason:
                    return "stopped"
                if not self.ledger.chunks(LIVE):
                    return "collected"
                retry_in = self.calls.take_wait()
                running = bool(self.ledger.chunks(("submitted",)))
                if self.no_wait and running and retry_in is None:
                    return "waiting"  # 75 only with a batch at the provider and nothing left to submit now
                wait = self.cfg.batch.poll_interval_s if moved else min(wait * 1.5, self.cfg.batch.poll_max_interval_s)
                pause = wait * self.rng.uniform(0.8, 1.2)
                if retry_in is not None:
                    pause = min(pause, retry_in) if running else retry_in
                if not await self._sleep(pause):
                    return "stopped"
        finally:
            for writer in self.all_writers():
                writer.abandon()
            self.bar.close()

    async def _sleep(self, seconds: float) -> bool:
        """Wait, waking early for Ctrl-C; False when the run was stopped meanwhile."""
        left = seconds
        while left > 0 and not self.engine.stop_reason:
            step = min(left, 0.2)
            await NAP(step)
            left -= step
        return not self.engine.stop_reason

    # -- 1. reconcile --------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle every intent with the provider before submitting anything."""
        stop = await self.reconciler.settle()
        if stop is not None:
            self.stop(stop)

    # -- 3. submit -----------------------------------------------------------------------------------

    async def write_pending(self) -> int:
        """Stream every request the store cannot answer, and no live file carries, into batch files."""
        if self.rounds is not None:
            return await self.rounds.write()
        writer = self.writer
        written = 0
        try:
            for batch in self.batches():
                jobs = self.engine.build(batch)
                known = self.engine.known(jobs.keys())
                fresh = [k for k in jobs if k not in known and k not in self.settled and k not in self.to_sync]
                spoken = self.ledger.spoken_for(fresh) if self.packs is None else self.packs.spoken_for(fresh)
                todo = [jobs[key] for key in fresh if key not in spoken]
                for job in todo if self.packs is None else self.packs.lines(todo):
                    writer.add(job.key, job.payload, job.est_prompt, job.n_images,
                               worst_line_cost(self.cfg, job.est_prompt, job.max_tokens, job.n_images))
                    written += 1
                writer.flush()
                await asyncio.sleep(0)  # let Ctrl-C and the store's commits in
                if self.engine.stop_reason:
                    break
        except BaseException:
            writer.abandon()  # the next run drops the half-written file and renders its lines again
            raise
        return written

    # -- cancel --------------------------------------------------------------------------------------

    async def cancel(self) -> int:
        """--cancel-batches: ask the provider to cancel this job's running batches; returns how many."""
        await self.reconcile()
        n = 0
        for chunk in self.ledger.chunks(("submitted",)):
            if chunk.status in TERMINAL or chunk.batch_id is None:
                continue
            try:
                batch = await self.client.cancel(chunk.batch_id)
            except (RequestError, RunFatalError) as exc:  # e.g. it finished meanwhile: collected next run
                log.warning("could not cancel batch %s: %s", chunk.batch_id,
                            describe(f"POST /batches/{chunk.batch_id}/cancel", exc))
                continue
            self.ledger.update(chunk.chunk, status=batch.get("status"), durable=True)
            n += 1
        return n

    # -- helpers -------------------------------------------------------------------------------------

    def writer_for(self, model: str | None) -> ChunkWriter:
        """The writer of a model's files (None: the job's endpoint.model, as before cascades)."""
        if model is None:
            return self.writer
        if model not in self.writers:
            self.writers[model] = ChunkWriter(self.ledger, self.folder, self.cfg.batch, before_line=self.at,
                                              model=model)
        return self.writers[model]

    def all_writers(self) -> list[ChunkWriter]:
        return [self.writer, *self.writers.values()]

    def known(self, keys: Collection[str]) -> dict[str, Record]:
        """The answers a row's next step is decided by: the store's, and the failures recorded by this run
        (a request whose retries ran out here is final for this run, as the write pass counts it)."""
        found = self.engine.known(keys)
        again = [k for k in keys if k in self.settled and k not in found]
        if again:
            found.update(self.store.get_many(again))
        return found

    def _modes(self) -> tuple[str | None, ...]:
        plans = [self.plan, *(plan for _, plan in self.engine.lanes.values())]
        return tuple(p.mode if p is not None else None for p in plans)

    def filename(self, chunk: Chunk) -> str:
        return f"pipeline-{self.ledger.job_id}-{chunk.name}.jsonl"

    def at(self, step: str) -> None:
        if FAULT_HOOK is not None:
            FAULT_HOOK(step)

    def stop(self, exc: Fatal) -> None:
        self.engine.stop(exc)
