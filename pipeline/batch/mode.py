"""The seam between the local runner and batch mode: drive the batches, then say how the run ended."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from ..common import layout
from ..core.context import RunContext
from ..errors import EXIT_BATCH_SUBMITTED, EXIT_STOPPED, UsageError
from ..prepare.packs import Packer
from ..send.transport import HttpTransport
from ..vocab import FINAL_STATES, InputBatch, Request
from ..write.output import Summary
from .driver import BatchDriver, Engine

# After the batches, the engine writes the outputs from the store. A request whose retries ran out in a
# batch is recorded as `transient` and is final for this run, like the other failures.
ALL_STATES = FINAL_STATES | {"transient"}


async def drive_batches(ctx: RunContext, transport: Any, batches: Callable[[], Iterable[InputBatch]]) -> str:
    """Run the batch phases of the run `ctx`; returns 'collected', 'waiting', 'stopped' or 'cancelled'.

    A first Ctrl-C stops the driver at its next step (the batches stay at the provider; the ledger knows
    them); a second one cancels it at once, even in the middle of an upload."""
    cfg, core, store, renderer, interrupt = ctx.cfg, ctx.core, ctx.store, ctx.renderer, ctx.interrupt
    no_wait, cancel, progress = ctx.options.no_wait, ctx.options.cancel_batches, ctx.progress
    folder = str(ctx.jobdir.path / layout.BATCH)
    transport = getattr(transport, "inner", transport)  # under ops' ObservedTransport, which counts chat sends
    if not isinstance(transport, HttpTransport):
        raise UsageError("run.mode: batch needs the HTTP transport (the Batch API's files and batches)")
    if no_wait and cfg.endpoint.base_url == "simulator":
        raise UsageError("--no-wait leaves batches at the endpoint, but the in-process simulator stops with this "
                         "run: serve it with `pipeline simulate --port 8089` and set endpoint.base_url to "
                         "http://127.0.0.1:8089/api/v1 (or run without --no-wait)")
    def build(batch: InputBatch) -> dict[str, Request]:
        built = core.builder.build_batch(batch, renderer)
        return (built if core.packs is None else Packer.rekey(built)).requests  # packed rows: their own keys

    trust = core.trust  # a cascade, an audit, votes as requests: rows go in rounds (rounds.py)
    engine = Engine(core, store, build, ctx.answers.lookup,
                    observe=ctx.invocation.tally.observe,  # each line an attempt in the metrics, as sync's are
                    route=trust.needs if trust is not None else None, lanes=trust.lanes() if trust is not None else {},
                    senders=trust.pack_senders() if trust is not None else {})
    driver = BatchDriver(cfg, folder, engine, transport, batches=batches, options=ctx.options,
                         progress=progress.enabled)
    task = asyncio.ensure_future(driver.cancel() if cancel else driver.run())
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if interrupt.hits >= 2 and not task.done():
            task.cancel()
    try:
        outcome = task.result()
    except asyncio.CancelledError:
        return "stopped"
    if cancel:
        progress.note(f"asked the provider to cancel {outcome} running batch(es)")
        return "cancelled"
    ctx.answers.keep = FINAL_STATES if cfg.batch.retry_via == "sync" else ALL_STATES
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
