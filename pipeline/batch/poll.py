"""Step 2 of a batch round: poll the job's batches at the provider and collect the finished ones.

A finished batch's output and error files are downloaded (resuming a partial download) and every line is
committed to the store by the Collector (collect.py) before the chunk counts as collected; lines to send
again go into the next file, and the rounds (rounds.py) learn which rows moved. Once its answers are
committed, the batch's files at the provider are deleted (batch.delete_files). A failed call about the
batches themselves is judged by calls.py: a transient one is tried again next round, anything else stops
the run naming the call. The driver (driver.py) holds the run's state; this module only moves it along.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..errors import PermanentError, RequestError, RunFatalError, TransientError
from .calls import describe, refused
from .client import TERMINAL, batch_errors, queue_full
from .collect import worst_line_cost
from .files import max_tokens_of, request_payloads, with_max_tokens
from .ledger import Chunk

if TYPE_CHECKING:
    from .driver import BatchDriver

log = logging.getLogger("pipeline")

POLL, DOWNLOAD, DELETE = "GET /batches/{id}", "GET /files/{id}/content", "DELETE /files/{id}"


class Poller:
    def __init__(self, driver: BatchDriver) -> None:
        self.d = driver

    async def collect(self) -> bool:
        """Poll every batch at the provider; collect the finished ones. True if anything moved."""
        d = self.d
        moved = False
        for chunk in d.ledger.chunks(("submitted",)):
            assert chunk.batch_id is not None
            try:
                batch = await d.client.get(chunk.batch_id)
            except (RequestError, RunFatalError) as exc:
                self._call_failed(POLL.replace("{id}", chunk.batch_id), exc,
                                  f"batch {chunk.batch_id} of {chunk.path} cannot be polled; was endpoint.base_url or "
                                  "the key changed since it was submitted? Fix that and re-run the same command",
                                  key=POLL)
                if d.engine.stop_reason:
                    return moved
                continue
            d.calls.ok(POLL)
            status = str(batch.get("status"))
            raw_counts = batch.get("request_counts")
            counts: dict[str, Any] = raw_counts if isinstance(raw_counts, dict) else {}
            moved |= status != chunk.status or counts != chunk.counts
            d.ledger.update(chunk.chunk, status=status, counts=counts)
            d.bar.show(chunk.chunk, status, counts, chunk.lines)
            d.at("polling")
            if status in TERMINAL:
                await self._collect(d.ledger.get(chunk.chunk), batch)
                moved = True
            if d.engine.stop_reason:
                break
        return moved

    async def _collect(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        d = self.d
        if batch.get("status") == "failed" and not queue_full(batch):
            d.ledger.update(chunk.chunk, state="rejected", durable=True)
            d.stop(RunFatalError(
                f"the provider rejected batch file {chunk.path} (batch {chunk.batch_id}): {batch_errors(batch)}; "
                "check that endpoint.base_url speaks the OpenAI Batch API and the model takes batches, "
                "then re-run the same command (or use run.mode: sync)"))
            return
        paths, files = [], [chunk.file_id]
        for kind in ("output_file_id", "error_file_id"):
            file_id = batch.get(kind)
            if not isinstance(file_id, str) or not file_id:
                continue
            files.append(file_id)
            dest = f"{chunk.path[:-len('.jsonl')]}.{kind.split('_')[0]}.jsonl"
            if not os.path.lexists(dest):  # a link planted there is refused when it is read
                if not await self._download(chunk, kind, file_id, dest):
                    return
            paths.append(dest)
        try:
            result = d.collector.collect(chunk, paths)
            d.store.sync()  # every answer on disk before the chunk counts as collected
        except RunFatalError as exc:  # nothing more can be stored (a full disk): what is committed stays
            d.stop(exc)
            return
        d.ledger.update(chunk.chunk, state="collected", durable=True)
        if d.cfg.batch.delete_files:
            d.ledger.add_cleanup(chunk.chunk, files)
        d.settled |= result.settled
        d.to_sync |= result.to_sync
        d.rerender |= bool(result.alone)
        if result.requeued:
            self._carry(chunk, result.requeued, result.raised)
        if d.rounds is not None:
            d.rounds.collected(chunk.chunk)
        for path in [chunk.path, *paths]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        log.info("collected batch %s (%s): %d answers and failures stored, %d lines to send again",
                 chunk.batch_id, batch.get("status"), result.records, len(result.requeued) + len(result.to_sync))

    async def _download(self, chunk: Chunk, kind: str, file_id: str, dest: str) -> bool:
        """One result file into `dest` (resuming a partial one); False: not now (tried again next round)."""
        d = self.d
        try:
            await d.client.download(file_id, dest + ".part")
        except PermanentError as exc:  # gone (files are deleted after some days): its lines go again
            log.warning("the %s of batch %s cannot be downloaded (%s); its lines are sent again",
                        kind, chunk.batch_id, exc)
            return True
        except (RequestError, RunFatalError) as exc:
            self._call_failed(DOWNLOAD.replace("{id}", file_id), exc,
                              f"the {kind} of batch {chunk.batch_id} cannot be downloaded; re-run the same command",
                              key=DOWNLOAD)
            return False
        d.calls.ok(DOWNLOAD)
        d.at("downloading")
        os.replace(dest + ".part", dest)
        return True

    def _carry(self, chunk: Chunk, keys: set[str], raised: dict[str, int]) -> None:
        """Lines to send again go into the next file, copied from the file that carried them (with a raised
        max_tokens where the length rule asked for one)."""
        d = self.d
        info = {key: (est, images) for key, est, images, _ in d.ledger.lines(chunk.chunk) if key in keys}
        writer, (cfg, _) = d.writer_for(chunk.model), d.engine.lane(chunk.model)
        into: set[int | None] = set()
        for key, payload in request_payloads(chunk.path, keys):
            est, images = info[key]
            if key in raised:
                payload = with_max_tokens(payload, raised[key])
            writer.add(key, payload, est, images, worst_line_cost(cfg, est, max_tokens_of(payload), images))
            into.add(writer.current)
        writer.flush()
        if d.rounds is not None:
            d.rounds.inherit(chunk.chunk, into)

    async def cleanup(self) -> None:
        """Delete the provider's copies of files whose answers are committed (batch.delete_files). A failure
        never stops the run: a transient one is tried again next round (or run), any other is said once."""
        d = self.d
        pending = d.ledger.cleanup()
        done: list[str] = []
        for file_id in pending:
            try:
                await d.client.delete(file_id)
            except TransientError as exc:
                log.info("%s; tried again later", describe(DELETE.replace("{id}", file_id), exc))
                break
            except (RequestError, RunFatalError) as exc:
                log.warning("%s; the job's batch files stay at the provider (delete them there, or set "
                            "batch.delete_files: false)", describe(DELETE.replace("{id}", file_id), exc),
                            extra={"event": "batch_files_kept"})
                done = pending  # the provider deletes none: do not ask again
                break
            done.append(file_id)
        if done:
            d.ledger.cleaned(done)
            log.info("deleted %d batch file(s) at the provider", len(done))

    def _call_failed(self, call: str, exc: RequestError | RunFatalError, todo: str, *, key: str) -> None:
        """A failed call about the batches themselves: transient ones are tried again next round, within
        the retry budget; anything else stops the run naming the call (a 4xx here is not one row's
        problem, it is the endpoint's answer to the protocol)."""
        d = self.d
        if isinstance(exc, TransientError):
            stop = d.calls.failed(key, exc, shown=call)
            if stop is not None:
                d.stop(stop)
            return
        d.stop(refused(call, exc, todo))
