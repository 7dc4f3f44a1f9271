"""Submitting batch files: upload and create, each behind an intent, within the queue cap and the budget.

The budget works per line, as the sync mode's does per request: every line of a file at the provider
holds its worst case (`worst_line_cost`) until its batch is collected; then the reservation is given
back and what the lines really cost is charged. A file whose lines do not all fit in what is left
(cap - spent - reserved) is split: the lines that fit go now, the rest wait in a file of their own
for running batches to be collected, so a job whose real cost fits its budget finishes in one run.
When nothing is running and not even one line fits, the budget is reached (exit 3).

Any failed call is judged by calls.py: a transient one (5xx, 429 with nothing of ours running, a lost
connection) is tried again after a backoff, within `limits.max_retries`; anything else stops the run
naming the call and its status. An answer received (any status) means nothing was created by the
call: its intent is rolled back at once; a call that got no answer leaves its intent for reconcile.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from ..errors import (
    BudgetExceeded,
    FatalReply,
    PermanentError,
    RateLimited,
    RequestError,
    RunFatalError,
    TransientError,
)
from .calls import describe, refused
from .collect import worst_line_cost
from .files import max_tokens_of, request_payloads
from .ledger import Chunk

if TYPE_CHECKING:
    from .driver import BatchDriver

log = logging.getLogger("pipeline")

UPLOAD, CREATE = "POST /files", "POST /batches"
_CHECK_BATCH_API = ("check that endpoint.base_url speaks the OpenAI Batch API, then re-run the same command "
                    "(or use run.mode: sync)")


class Submitter:
    def __init__(self, driver: BatchDriver) -> None:
        self.d = driver

    async def submit(self) -> None:
        """Upload and create the ready files, in order, while the queue cap and the budget allow."""
        d = self.d
        for writer in d.all_writers():
            writer.close()
        cap = d.cfg.batch.max_enqueued_tokens
        while not d.engine.stop_reason:
            waiting = d.ledger.chunks(("ready", "uploaded"))
            if not waiting:
                return
            tokens, _ = d.ledger.in_flight()
            chunk = waiting[0]
            if cap is not None and tokens and tokens + chunk.est_tokens > cap:
                return  # the provider's queue for this model is full: wait for batches to finish
            fitting = self.fit_budget(chunk)
            if fitting is None or not await self._submit(fitting):
                return

    # -- the budget ----------------------------------------------------------------------------------

    def fit_budget(self, chunk: Chunk) -> Chunk | None:
        """The chunk, or the part of it whose lines fit the budget now; None: wait, or stopped."""
        d = self.d
        budget = d.engine.core.budget
        if budget.cap is None:
            return chunk
        _, reserved = d.ledger.in_flight()
        room = budget.cap - budget.spent - reserved
        if chunk.worst_usd <= room:
            return chunk
        lines = self._lines(chunk)
        fit, total = 0, 0.0
        for *_, worst in lines:
            if total + worst > room:
                break
            total += worst
            fit += 1
        if not fit:
            if reserved > 0:
                return None  # running batches hold the room: wait for their collection
            first = lines[0][-1] if lines else chunk.worst_usd
            d.stop(BudgetExceeded(
                f"budget reached: spent ${budget.spent:.4f}, and the next batch line may cost up to ${first:.4f}, "
                f"over budget.max_cost_usd=${budget.cap:g}"))
            return None
        return self._split(chunk, lines, fit)

    def _lines(self, chunk: Chunk) -> list[tuple[str, bytes, int, int, float]]:
        """(key, payload, est, images, worst case) of each line of the chunk's file, in file order."""
        cfg, _ = self.d.engine.lane(chunk.model)  # a cascade's later stage: its model's batch price
        info = {key: (est, images) for key, est, images, _ in self.d.ledger.lines(chunk.chunk)}
        out = []
        for key, payload in request_payloads(chunk.path, set(info)):
            est, images = info[key]
            out.append((key, payload, est, images, worst_line_cost(cfg, est, max_tokens_of(payload), images)))
        return out

    def _split(self, chunk: Chunk, lines: list[tuple[str, bytes, int, int, float]], fit: int) -> Chunk:
        """The first `fit` lines into a file of their own, the rest into another; the old chunk is dropped
        first (a kill in between leaves its lines free: rendered again by the next run)."""
        d = self.d
        d.ledger.drop(chunk.chunk, state="split")
        if chunk.file_id is not None:  # uploaded already: that copy is never used
            d.ledger.add_cleanup(chunk.chunk, [chunk.file_id])
        head, rest = None, None
        writer = d.writer_for(chunk.model)
        for i, (key, payload, est, images, worst) in enumerate(lines):
            writer.add(key, payload, est, images, worst)
            if i == fit - 1:
                head = writer.close()
        rest = writer.close()
        if d.rounds is not None:
            d.rounds.inherit(chunk.chunk, [c.chunk for c in (head, rest) if c is not None])
        with contextlib.suppress(FileNotFoundError):
            os.remove(chunk.path)
        assert head is not None
        log.info("the budget leaves room for %d of the %d lines of %s now: split into %s and the rest",
                 fit, len(lines), chunk.name, head.name)
        return head

    # -- upload and create ---------------------------------------------------------------------------

    async def _submit(self, chunk: Chunk) -> bool:
        """Upload (if not yet) and create one batch; False when it has to wait (or the run stopped)."""
        d = self.d
        file_id = chunk.file_id
        if chunk.state == "ready":
            d.ledger.update(chunk.chunk, state="uploading", intent_at=time.time(), durable=True)
            try:
                file_id = await d.client.upload(chunk.path, d.filename(chunk))
            except (RequestError, RunFatalError) as exc:
                if getattr(exc, "status", None) is not None:  # answered: nothing was uploaded
                    d.ledger.update(chunk.chunk, state="ready", durable=True)
                return self._failed(UPLOAD, exc, chunk)
            d.calls.ok(UPLOAD)
            d.at("uploaded")
            d.ledger.update(chunk.chunk, state="uploaded", file_id=file_id, durable=True)
        assert file_id is not None
        d.ledger.update(chunk.chunk, state="creating", intent_at=time.time(), durable=True)
        metadata = {"pipeline_job": d.ledger.job_id, "pipeline_chunk": str(chunk.chunk),
                    "pipeline_lines": str(chunk.lines)}
        try:
            batch = await d.client.create(file_id, metadata)
        except (RequestError, RunFatalError) as exc:
            if getattr(exc, "status", None) is not None:  # answered: nothing was created
                d.ledger.update(chunk.chunk, state="uploaded", durable=True)
            if isinstance(exc, RateLimited) and d.ledger.chunks(("submitted",)):
                # Too many batches or enqueued tokens, ours among them: the file waits for them.
                log.info("the provider refused a new batch for now (%s); %s waits for running batches", exc,
                         chunk.name)
                return False
            return self._failed(CREATE, exc, chunk)
        d.calls.ok(CREATE)
        d.at("created")
        d.ledger.update(chunk.chunk, state="submitted", batch_id=batch["id"], status=batch.get("status"),
                        durable=True)
        d.engine.core.stats.requests_sent += chunk.lines
        log.info("submitted %s: %d requests as batch %s", chunk.name, chunk.lines, batch["id"])
        return True

    def _failed(self, call: str, exc: RequestError | RunFatalError, chunk: Chunk) -> bool:
        d = self.d
        if isinstance(exc, TransientError):
            stop = d.calls.failed(call, exc)
            if stop is not None:
                d.stop(stop)
            return False
        if isinstance(exc, (FatalReply, PermanentError, RunFatalError)):
            d.stop(refused(call, exc, f"the provider refused batch file {chunk.path}; {_CHECK_BATCH_API}"))
            return False
        # Bad content cannot come from a files or batches call; any other answer is still one we cannot use.
        d.stop(RunFatalError(f"{describe(call, exc)}; {_CHECK_BATCH_API}"))
        return False
