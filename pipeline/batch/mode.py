"""The seam between the local runner and batch mode: drive the batches, then say how the run ended."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Config
from ..errors import EXIT_BATCH_SUBMITTED, EXIT_STOPPED, UsageError
from ..read.reader import InputBatch
from ..send.dispatch import Job
from ..send.transport import HttpTransport
from ..state.store import FINAL_STATES
from ..write.output import Summary
from .driver import BatchDriver

# After the batches, the engine writes the outputs from the store. A request whose retries ran out in a
# batch is recorded as `transient` and is final for this run, like the other failures.
ALL_STATES = FINAL_STATES | {"transient"}


async def drive_batches(cfg: Config, folder: str, engine: Any, transport: Any,
                        batches: Callable[[], Iterable[InputBatch]], render: Callable[[InputBatch], dict[str, Job]],
                        *, no_wait: bool, cancel: bool, progress: bool) -> str:
    """Run the batch phases; returns 'collected', 'waiting', 'stopped' or 'cancelled'.

    The driver runs as one of the engine's request tasks, so a second Ctrl-C cancels it at once (the
    batches stay at the provider; the ledger knows them)."""
    if not isinstance(transport, HttpTransport):
        raise UsageError("run.mode: batch needs the HTTP transport (the Batch API's files and batches)")
    driver = BatchDriver(cfg, folder, engine.dispatcher, engine.plan, transport, batches=batches, render=render,
                         known=engine._known, no_wait=no_wait, progress=progress)
    task = asyncio.ensure_future(driver.cancel() if cancel else driver.run())
    engine.request_tasks.add(task)
    try:
        outcome = await task
    except asyncio.CancelledError:
        if not engine.dispatcher.stop_reason:
            raise
        return "stopped"
    finally:
        engine.request_tasks.discard(task)
    if cancel:
        engine.progress.note(f"asked the provider to cancel {outcome} running batch(es)")
        return "cancelled"
    engine.keep_states = FINAL_STATES if cfg.batch.retry_via == "sync" else ALL_STATES
    return str(outcome)


def finish(summary: Summary, state: str, resume: str) -> None:
    """The exit code and next step of a batch run that did not get to write every row."""
    if state == "waiting":
        summary.stopped, summary.exit_code = "batch_submitted", EXIT_BATCH_SUBMITTED
        summary.next_step = f"submitted; run the same command again to collect: {resume}"
    elif state == "cancelled":
        summary.stopped, summary.exit_code = "batches_cancelled", EXIT_STOPPED
        summary.next_step = ("the job's batches were cancelled at the provider; run the same command again to "
                             f"collect what they finished and submit the rest: {resume}")
    elif state == "stopped" and summary.stopped == "interrupted":
        summary.next_step = f"the batches keep running at the provider; run the same command again to collect: {resume}"
