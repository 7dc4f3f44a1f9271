"""Settle the ledger's intents with the provider before anything is submitted (after a kill -9).

What may exist at the provider without the ledger knowing it:
  uploading  the file may have been uploaded. Adopted by its name when the server lists files
             (`GET /files`); a server that lists none (405, 404), or any listing we cannot use, costs only
             a second upload: the chunk is uploaded again (re-uploading pays nothing; the orphan file, its
             id unknown, stays at the provider until its expiry).
  creating   the batch may have been created: this is what must never happen twice (it is paid). Adopted
             by the batch's metadata (this job's id + the chunk number) from `GET /batches`, listed newest
             first down to an hour before the intent; not among them: it was never created, create it. A
             listing we cannot use leaves no way to tell: the run stops (exit 3) naming the call, the
             status and the way out; `--force-new` (the user's word that no such batch exists, or that
             paying twice is fine) creates it again.
A chunk killed while being written never left the machine: its file is removed and its lines are
rendered again.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import FatalReply, RequestError, RunFatalError, TransientError
from .calls import Calls, describe, refused
from .client import BatchClient
from .ledger import Chunk, Ledger

log = logging.getLogger("pipeline")

LIST_FILES, LIST_BATCHES = "GET /files", "GET /batches"


class Reconciler:
    def __init__(self, ledger: Ledger, client: BatchClient, calls: Calls, filename: Callable[[Chunk], str], *,
                 force_new: bool = False) -> None:
        self.ledger, self.client, self.calls, self.filename = ledger, client, calls, filename
        self.force_new = force_new

    async def settle(self) -> RunFatalError | None:
        """Settle every intent; the error to stop the run with, if one cannot be settled."""
        for chunk in self.ledger.chunks(("writing",)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(chunk.path)
            self.ledger.drop(chunk.chunk)
        uploading = {self.filename(c): c for c in self.ledger.chunks(("uploading",))}
        if uploading:
            await self._adopt_files(uploading)
        creating = {str(c.chunk): c for c in self.ledger.chunks(("creating",))}
        return await self._adopt_batches(creating) if creating else None

    async def _adopt_files(self, uploading: dict[str, Chunk]) -> None:
        try:
            async for f in self.client.files():
                chunk = uploading.get(str(f.get("filename")))
                if chunk is not None and f.get("bytes") in (None, chunk.bytes) and isinstance(f.get("id"), str):
                    log.info("adopting file %s for %s, uploaded before the last run stopped", f["id"], chunk.name)
                    self.ledger.update(chunk.chunk, state="uploaded", file_id=f["id"], durable=True)
                    del uploading[str(f.get("filename"))]
                    if not uploading:
                        break
            self.calls.ok(LIST_FILES)
        except (RequestError, RunFatalError) as exc:
            # Only a second upload is at stake: whatever the listing answered, upload again.
            log.warning("%s; uploading %d file(s) again that may have been uploaded before the last run stopped",
                        describe(LIST_FILES, exc), len(uploading))
        for chunk in uploading.values():  # never reached the provider, or cannot be told: upload again
            self.ledger.update(chunk.chunk, state="ready", durable=True)

    async def _adopt_batches(self, creating: dict[str, Chunk]) -> RunFatalError | None:
        oldest = min((c.intent_at or 0) for c in creating.values()) - 3600
        try:
            async for b in self.client.batches():
                raw_meta = b.get("metadata")
                meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
                ours = meta.get("pipeline_job") == self.ledger.job_id
                chunk = creating.get(str(meta.get("pipeline_chunk"))) if ours else None
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
            self.calls.ok(LIST_BATCHES)
        except (RequestError, RunFatalError) as exc:
            return self._unsettled(creating, exc)
        for chunk in creating.values():  # the create never reached the provider: create again
            self.ledger.update(chunk.chunk, state="uploaded", durable=True)
        return None

    def _unsettled(self, creating: dict[str, Chunk], exc: RequestError | RunFatalError) -> RunFatalError | None:
        """The batches cannot be listed: nobody can tell whether these chunks' batches exist."""
        if isinstance(exc, FatalReply):  # the key: nothing else would get through either
            return refused(LIST_BATCHES, exc, "")
        if self.force_new:
            for chunk in creating.values():
                log.warning("%s; --force-new: creating the batch of %s again (a batch created before the last "
                            "run stopped, if any, is not collected)", describe(LIST_BATCHES, exc), chunk.name)
                self.ledger.update(chunk.chunk, state="uploaded", durable=True)
            return None
        if isinstance(exc, TransientError):
            return self.calls.failed(LIST_BATCHES, exc)  # tried again after a backoff, within the retry budget
        names = ", ".join(f"pipeline_chunk={c.chunk}" for c in list(creating.values())[:5])
        return refused(LIST_BATCHES, exc,
                       f"the run stopped before it could record whether the batch of {len(creating)} file(s) was "
                       "created, and without the list of batches that cannot be told (creating it again could pay "
                       f"twice). Look at the provider for a batch with metadata pipeline_job={self.ledger.job_id} "
                       f"and {names}; cancel it if it is there, then run the same command with --force-new to "
                       "submit those lines again",
                       hint="cancel that batch at the provider if it exists, then add --force-new to")
