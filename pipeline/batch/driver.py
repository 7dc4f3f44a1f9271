"""run.mode: batch — fill the job's answer store through the provider's Batch API.

One pass of `run_batches` per `pipeline run`, in this order, so that a run killed at any instant is
resumed by running the same command again:
  1. reconcile: before anything is submitted, every intent the ledger holds is settled against the
     provider (a file uploaded but not recorded is adopted by its name, a batch created but not
     recorded by its metadata: job id + chunk number), and a file killed while being written is dropped;
  2. collect: poll the batches at the provider; a finished one's output and error files are downloaded
     (resuming a partial download) and every line is committed to the store (collect.py) before the
     chunk counts as collected;
  3. submit: the requests the store cannot answer are rendered by the very builder the sync mode uses
     (same body, same request key), streamed into files within the caps, uploaded and created, each
     step behind an intent recorded (and fsynced) first; the queue cap (batch.max_enqueued_tokens) and
     the budget (submitted lines at their worst case) are checked before each create;
  4. wait (poll_interval_s, backing off with jitter to poll_max_interval_s) and go round again, until
     nothing is in flight and nothing is left to send.
Then the ordinary engine writes results/failures/summary from the store, with nothing left to send,
so the outputs are exactly those of a sync run. Ctrl-C, a run-fatal error or `--no-wait` leave the
batches running at the provider; the next run collects them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import Config
from ..core.transformer import Core
from ..errors import (
    BudgetExceeded,
    Fatal,
    FatalReply,
    PermanentError,
    RateLimited,
    RunFatalError,
    TransientError,
)
from ..send.transport import HttpTransport
from ..state.store import Store
from ..vocab import InputBatch, Record, Request
from .client import TERMINAL, BatchClient, batch_errors, queue_full
from .collect import Collector, worst_line_cost
from .files import ChunkWriter, request_payloads
from .ledger import LIVE, Chunk, Ledger
from .progress import BatchBar

log = logging.getLogger("pipeline")

# Tests inject failures here: called with the step's name ("writing", "uploaded", "created", "polling",
# "downloading") at the moment a kill at that step would hurt most. None in production.
FAULT_HOOK: Callable[[str], None] | None = None



@dataclass
class Engine:
    """What the driver uses of the run: the core (its builder, stats, budget and stop), the job's store,
    and the same request building and answer lookup as the sync mode."""

    core: Core
    store: Store
    build: Callable[[InputBatch], dict[str, Request]]
    known: Callable[[Collection[str]], dict[str, Record]]

    def stop(self, exc: Fatal) -> None:
        """Stop the run for a run-fatal reason, as the dispatcher does."""
        self.core.fail_run(exc)

    @property
    def stop_reason(self) -> str | None:
        return self.core.stop_reason


def _at(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


class BatchDriver:
    def __init__(self, cfg: Config, folder: str, engine: Engine, transport: HttpTransport, *,
                 batches: Callable[[], Iterable[InputBatch]], no_wait: bool = False, progress: bool = False,
                 rng: random.Random | None = None) -> None:
        self.cfg, self.folder, self.engine = cfg, folder, engine
        self.plan = engine.core.plan
        self.store = engine.store
        self.ledger = Ledger(self.store)
        self.client = BatchClient(transport)
        self.collector = Collector(cfg, self.ledger, engine, self.plan)
        self.batches = batches
        self.no_wait, self.rng = no_wait, rng or random.Random()
        self.writer = ChunkWriter(self.ledger, folder, cfg.batch, before_line=_at)
        self.settled: set[str] = set()  # failures recorded by this run: not sent again by it
        self.to_sync: set[str] = set()  # batch.retry_via: sync — left for the engine's sync pass
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
                mode = self.plan.mode if self.plan is not None else None
                moved = await self.collect()
                if self.plan is not None and self.plan.mode != mode:
                    render = True  # a structured-mode fallback: every request is shaped anew
                if self.engine.stop_reason:
                    return "stopped"
                if render:
                    await self.write_pending()
                    render = False
                if not self.engine.stop_reason:
                    await self.submit()
                if self.engine.stop_reason:
                    return "stopped"
                if not self.ledger.chunks(LIVE):
                    return "collected"
                if self.no_wait:
                    return "waiting"
                wait = self.cfg.batch.poll_interval_s if moved else min(wait * 1.5, self.cfg.batch.poll_max_interval_s)
                if not await self._sleep(wait * self.rng.uniform(0.8, 1.2)):
                    return "stopped"
        finally:
            self.writer.abandon()
            self.bar.close()

    async def _sleep(self, seconds: float) -> bool:
        """Wait, waking early for Ctrl-C; False when the run was stopped meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))
            if self.engine.stop_reason:
                return False
        return not self.engine.stop_reason

    # -- 1. reconcile --------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle every intent with the provider before submitting anything."""
        for chunk in self.ledger.chunks(("writing",)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(chunk.path)
            self.ledger.drop(chunk.chunk)
        uploading = {self._filename(c): c for c in self.ledger.chunks(("uploading",))}
        creating = {str(c.chunk): c for c in self.ledger.chunks(("creating",))}
        try:
            if uploading:
                await self._adopt_files(uploading)
            if creating:
                await self._adopt_batches(creating)
        except TransientError as exc:
            log.warning("could not list the provider's files or batches (%s); will try again", exc)
            return
        except (RunFatalError, FatalReply) as exc:
            self._stop(exc)

    async def _adopt_files(self, uploading: dict[str, Chunk]) -> None:
        async for f in self.client.files():
            chunk = uploading.get(str(f.get("filename")))
            if chunk is not None and f.get("bytes") in (None, chunk.bytes) and isinstance(f.get("id"), str):
                log.info("adopting file %s for %s, uploaded before the last run stopped", f["id"], chunk.name)
                self.ledger.update(chunk.chunk, state="uploaded", file_id=f["id"], durable=True)
                del uploading[str(f.get("filename"))]
                if not uploading:
                    break
        for chunk in uploading.values():  # never reached the provider: upload again
            self.ledger.update(chunk.chunk, state="ready", durable=True)

    async def _adopt_batches(self, creating: dict[str, Chunk]) -> None:
        oldest = min((c.intent_at or 0) for c in creating.values()) - 3600
        async for b in self.client.batches():
            meta: dict[str, Any] = b["metadata"] if isinstance(b.get("metadata"), dict) else {}
            chunk = creating.get(str(meta.get("pipeline_chunk"))) if meta.get("pipeline_job") == self.ledger.job_id else None
            if chunk is not None and isinstance(b.get("id"), str):
                log.info("adopting batch %s for %s, created before the last run stopped", b["id"], chunk.name)
                self.ledger.update(chunk.chunk, state="submitted", batch_id=b["id"], status=b.get("status"),
                                   durable=True)
                del creating[str(chunk.chunk)]
                if not creating:
                    break
            created = b.get("created_at")
            if isinstance(created, (int, float)) and created < oldest:
                break  # listed newest first: older batches cannot be ours
        for chunk in creating.values():  # the create never reached the provider: create again
            self.ledger.update(chunk.chunk, state="uploaded", durable=True)

    # -- 2. collect ----------------------------------------------------------------------------------

    async def collect(self) -> bool:
        """Poll every batch at the provider; collect the finished ones. True if anything moved."""
        moved = False
        for chunk in self.ledger.chunks(("submitted",)):
            assert chunk.batch_id is not None
            try:
                batch = await self.client.get(chunk.batch_id)
            except TransientError as exc:
                log.warning("polling batch %s failed (%s); will poll again", chunk.batch_id, exc)
                continue
            except (RunFatalError, FatalReply, PermanentError) as exc:
                self._refused(exc, f"polling batch {chunk.batch_id} of {chunk.path} failed: {exc}; was "
                                   "endpoint.base_url or the key changed since it was submitted? Fix that and re-run "
                                   "the same command")
                return moved
            status = str(batch.get("status"))
            counts: dict[str, Any] = batch["request_counts"] if isinstance(batch.get("request_counts"), dict) else {}
            moved |= status != chunk.status or counts != chunk.counts
            self.ledger.update(chunk.chunk, status=status, counts=counts)
            self.bar.show(chunk.chunk, status, counts, chunk.lines)
            _at("polling")
            if status in TERMINAL:
                try:
                    await self._collect(self.ledger.get(chunk.chunk), batch)
                except (RunFatalError, FatalReply) as exc:
                    self._stop(exc)
                moved = True
            if self.engine.stop_reason:
                break
        return moved

    async def _collect(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        if batch.get("status") == "failed" and not queue_full(batch):
            self.ledger.update(chunk.chunk, state="rejected", durable=True)
            self._stop(RunFatalError(
                f"the provider rejected batch file {chunk.path} (batch {chunk.batch_id}): {batch_errors(batch)}; "
                "check that endpoint.base_url speaks the OpenAI Batch API and the model takes batches, "
                "then re-run the same command (or use run.mode: sync)"))
            return
        paths = []
        for kind in ("output_file_id", "error_file_id"):
            file_id = batch.get(kind)
            if not isinstance(file_id, str) or not file_id:
                continue
            dest = f"{chunk.path[:-len('.jsonl')]}.{kind.split('_')[0]}.jsonl"
            if not os.path.lexists(dest):  # a link planted there is refused when it is read
                try:
                    await self.client.download(file_id, dest + ".part")
                except TransientError as exc:
                    log.warning("downloading %s of batch %s failed (%s); will resume", kind, chunk.batch_id, exc)
                    return
                except PermanentError as exc:  # gone (files are deleted after some days): its lines go again
                    log.warning("the %s of batch %s cannot be downloaded (%s); its lines are sent again",
                                kind, chunk.batch_id, exc)
                    continue
                _at("downloading")
                os.replace(dest + ".part", dest)
            paths.append(dest)
        result = self.collector.collect(chunk, paths)
        self.store.sync()  # every answer on disk before the chunk counts as collected
        self.ledger.update(chunk.chunk, state="collected", durable=True)
        self.settled |= result.settled
        self.to_sync |= result.to_sync
        if result.requeued:
            self._carry(chunk, result.requeued)
        for path in [chunk.path, *paths]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        log.info("collected batch %s (%s): %d answers and failures stored, %d lines to send again",
                 chunk.batch_id, batch.get("status"), result.records, len(result.requeued) + len(result.to_sync))

    def _carry(self, chunk: Chunk, keys: set[str]) -> None:
        """Lines to send again go into the next file, copied from the file that carried them."""
        info = {key: (est, images) for key, est, images, _ in self.ledger.lines(chunk.chunk) if key in keys}
        for key, payload in request_payloads(chunk.path, keys):
            est, images = info[key]
            self.writer.add(key, payload, est, images, worst_line_cost(self.cfg, est, _max_tokens(payload), images))
        self.writer.flush()

    # -- 3. submit -----------------------------------------------------------------------------------

    async def write_pending(self) -> int:
        """Stream every request the store cannot answer, and no live file carries, into batch files."""
        writer = self.writer
        written = 0
        try:
            for batch in self.batches():
                jobs = self.engine.build(batch)
                known = self.engine.known(jobs.keys())
                fresh = [k for k in jobs if k not in known and k not in self.settled and k not in self.to_sync]
                spoken = self.ledger.spoken_for(fresh)
                for key in fresh:
                    if key in spoken:
                        continue
                    job = jobs[key]
                    writer.add(key, job.payload, job.est_prompt, job.n_images,
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

    async def submit(self) -> None:
        """Upload and create the ready files, in order, while the queue cap and the budget allow."""
        self.writer.close()
        tokens, worst = self.ledger.in_flight()
        cap = self.cfg.batch.max_enqueued_tokens
        budget = self.cfg.budget.max_cost_usd
        for chunk in self.ledger.chunks(("ready", "uploaded")):
            if cap is not None and tokens and tokens + chunk.est_tokens > cap:
                return  # the provider's queue for this model is full: wait for batches to finish
            spent = self.engine.core.budget.spent
            if budget is not None and spent + worst + chunk.worst_usd > budget:
                self._stop(BudgetExceeded(
                    f"budget reached: spent ${spent:.4f}, ${worst:.4f} in running batches at "
                    f"their worst case, and the next batch file ({chunk.lines:,} lines) may cost up to "
                    f"${chunk.worst_usd:.4f}, over budget.max_cost_usd=${budget:g}"))
                return
            try:
                if not await self._submit(chunk):
                    return
            except TransientError as exc:
                log.warning("submitting %s failed (%s); will try again", chunk.name, exc)
                return
            except (RunFatalError, FatalReply, PermanentError) as exc:
                self._refused(exc, f"the provider refused batch file {chunk.path}: {exc}; check endpoint.base_url "
                                   "speaks the OpenAI Batch API, then re-run the same command (or use run.mode: sync)")
                return
            tokens += chunk.est_tokens
            worst += chunk.worst_usd

    async def _submit(self, chunk: Chunk) -> bool:
        """Upload (if not yet) and create one batch; False when the provider asks us to wait (429)."""
        file_id = chunk.file_id
        if chunk.state == "ready":
            self.ledger.update(chunk.chunk, state="uploading", intent_at=time.time(), durable=True)
            file_id = await self.client.upload(chunk.path, self._filename(chunk))
            _at("uploaded")
            self.ledger.update(chunk.chunk, state="uploaded", file_id=file_id, durable=True)
        assert file_id is not None
        self.ledger.update(chunk.chunk, state="creating", intent_at=time.time(), durable=True)
        metadata = {"pipeline_job": self.ledger.job_id, "pipeline_chunk": str(chunk.chunk),
                    "pipeline_lines": str(chunk.lines)}
        try:
            batch = await self.client.create(file_id, metadata)
        except RateLimited as exc:  # too many batches or enqueued tokens: nothing was created
            self.ledger.update(chunk.chunk, state="uploaded", durable=True)
            log.info("the provider refused a new batch for now (%s); %s waits for running batches", exc, chunk.name)
            return False
        _at("created")
        self.ledger.update(chunk.chunk, state="submitted", batch_id=batch["id"], status=batch.get("status"),
                           durable=True)
        self.engine.core.stats.requests_sent += chunk.lines
        log.info("submitted %s: %d requests as batch %s", chunk.name, chunk.lines, batch["id"])
        return True

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
            except (TransientError, PermanentError) as exc:  # e.g. it finished meanwhile: collected next run
                log.warning("could not cancel batch %s: %s", chunk.batch_id, exc)
                continue
            self.ledger.update(chunk.chunk, status=batch.get("status"), durable=True)
            n += 1
        return n

    def _filename(self, chunk: Chunk) -> str:
        return f"pipeline-{self.ledger.job_id}-{chunk.name}.jsonl"

    def _stop(self, exc: Fatal) -> None:
        self.engine.stop(exc)

    def _refused(self, exc: Fatal | PermanentError, message: str) -> None:
        """A call about the batches themselves failed for good: the run stops (a 4xx here is not one
        row's problem, it is the endpoint's answer to the protocol), saying `message`."""
        self._stop(RunFatalError(message) if isinstance(exc, PermanentError) else exc)


def _max_tokens(payload: bytes) -> int | None:
    body = orjson.loads(payload)
    value = body.get("max_tokens", body.get("max_completion_tokens")) if isinstance(body, dict) else None
    return value if isinstance(value, int) else None
