"""The local driver: one job folder from lock to summary, around the transformer core (core.py).

`run_async` locks `output.dir`, checks the job (state/jobdir.py: the job is what shapes requests, the
input is data), opens the SQLite answer store (and the shared cache), starts the simulator when asked,
and feeds the input's batches to `Core`, except those whose part (named after the batch's content) can
be reused as it is; each outcome batch becomes Parquet part files and a row in the store's part index;
at the end this input's parts are merged into results.parquet / failures.parquet, parts of batches the
input no longer has are pruned and summary.json is written. Signals: engines/interrupt.py. Every
invocation is one record in history.jsonl, with pipeline.log, metrics and alerts (ops/invocation.py).
The synchronous `run()` of the Python API, with its keyword overrides, is engines/api.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Unpack

from ..common import lean
from ..common.parts import drop_partial_parts, part_context, part_names, part_number
from ..config import Config, day_note, load_config
from ..core.context import RunContext, RunFlags, RunOptions
from ..core.finish import RowCount, figures, finish, prompt_cache_figures, versions
from ..core.interrupt import Interrupt
from ..core.progress import Live, Progress
from ..core.transformer import Core, OutcomeBatch
from ..errors import InputChangedError
from ..models.prices import find_price
from ..ops.figures import ObservedTransport
from ..ops.invocation import Invocation
from ..prepare.prompts import Renderer
from ..prepare.structured import StructuredPlan, plan_for
from ..prepare.tokens import CALIBRATION_META, counter_for
from ..read.reader import InputScan, Source
from ..send.budget import MARKUP_META, Budget
from ..send.limits import Limits
from ..send.stats import Stats
from ..send.transport import HttpTransport, Transport
from ..state.answers import LocalAnswers
from ..state.jobdir import JobDir, resume_command
from ..state.store import PartCounts, Store
from ..vocab import InputBatch, Record
from ..write.output import (
    OutputColumns,
    Summary,
    failure_counts,
    merge_parts,
    output_ids,
    quality_layout,
    write_part,
)
from ..write.publish import check_local_output, publish_outputs
from ..write.quality import apply_gate, quality_figures

log = logging.getLogger("pipeline")


async def run_async(cfg: Config, *, schema: dict[str, Any] | None = None, transport: Transport | None = None,
                    interrupt: Interrupt | None = None, **flags: Unpack[RunFlags]) -> Summary:
    """Run one job to completion, stop or interruption; never raises for row-level problems.

    `flags` are RunOptions' fields (retry_failed, force_new, quiet, handle_signals, no_wait, cancel_batches,
    config_path, overrides). `interrupt` lets another thread stop the run as Ctrl-C would (see `run`).
    Every invocation, refused and failed ones included, is one record in output.dir/history.jsonl
    (ops/invocation.py)."""
    options = RunOptions(**flags)
    if schema is not None:  # into the config, so the job fingerprint covers the schema actually asked for
        cfg = load_config(cfg, {"structured.schema": schema})
    if cfg.run.engine == "ray":  # the same job on Ray actors (engines/ray/); Ray is imported only here
        from .ray import run_ray
        return await asyncio.to_thread(run_ray, cfg, retry_failed=options.retry_failed,
                                       force_new=options.force_new, schema=schema, quiet=options.quiet,
                                       config_path=options.config_path or cfg.source, overrides=options.overrides)
    check_local_output(cfg)
    lean.keep_pandas_out()
    invocation = Invocation(cfg)
    try:
        summary = await _run_job(cfg, invocation, options, schema=schema, transport=transport, interrupt=interrupt)
    except BaseException as exc:
        await invocation.finish(None, exc)
        raise
    await invocation.finish(summary, None)
    return summary


class _Prepared(NamedTuple):
    """What a run checks and builds before it touches the job folder."""

    jobdir: JobDir
    source: Source
    scan: InputScan
    renderer: Renderer
    plan: StructuredPlan | None
    api_key: str
    commands: tuple[str, str]  # the command that resumes, and the one that retries failed rows
    started: float             # time.monotonic() when the run began


def _prepare(cfg: Config, schema: dict[str, Any] | None, options: RunOptions) -> _Prepared:
    """Scan the input, compile the prompt and the structured plan, read the key: all of it before the
    folder is touched, so a bad start writes nothing new."""
    started = time.monotonic()
    config_path = options.config_path or cfg.source
    commands = (resume_command(config_path, options.overrides, retry_failed=options.retry_failed,
                               out_dir=cfg.output.dir),
                resume_command(config_path, options.overrides, retry_failed=True, out_dir=cfg.output.dir))
    jobdir = JobDir(cfg.output.dir)
    jobdir.adopt_batch_size(cfg)  # read-only, before the scan: unchanged batches keep their boundaries
    source = Source(cfg.input)
    scan = source.scan()
    if (note := day_note(cfg, scan.rows)) is not None:
        log.warning(note, extra={"event": "slow_limit"})
    renderer = Renderer(cfg, input_dir=str(Path(source.files[0]).parent) if source.files else None,
                        columns=scan.columns)
    return _Prepared(jobdir, source, scan, renderer, plan_for(cfg, schema), cfg.api_key(), commands, started)


async def _run_job(cfg: Config, invocation: Invocation, options: RunOptions, *, schema: dict[str, Any] | None,
                   transport: Transport | None, interrupt: Interrupt | None) -> Summary:
    prepared = _prepare(cfg, schema, options)
    prepared.jobdir.lock()
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(_collector_tuned())
            invocation.attach(prepared.jobdir.path)
            manifest = prepared.jobdir.check_job(cfg, force_new=options.force_new,
                                                 config_path=options.config_path or cfg.source,
                                                 command=prepared.commands[0])
            base_url = await _endpoint_url(cfg, stack)
            observed = ObservedTransport(transport or _http_transport(cfg, base_url, prepared.api_key),
                                         invocation.tally)
            ctx = _context(cfg, options, invocation, prepared, manifest, observed, interrupt or Interrupt(), stack)
            return await _drive_run(ctx, observed)
    finally:
        prepared.jobdir.unlock()


def _context(cfg: Config, options: RunOptions, invocation: Invocation, prepared: _Prepared,
             manifest: dict[str, Any], transport: Transport, interrupt: Interrupt,
             stack: contextlib.AsyncExitStack) -> RunContext:
    """The run's parts, built once: store, cache, the parts plan, limits, progress, answers and the core."""
    jobdir, scan, renderer, plan = prepared.jobdir, prepared.scan, prepared.renderer, prepared.plan
    store = _open_store(cfg, jobdir, manifest, plan, renderer, stack)
    stats = Stats()
    spent_before = store.totals()["cost_usd"]
    columns = _output_columns(cfg, plan)
    names, reuse, reused = _parts_plan(jobdir, manifest, store, scan, columns, retry_failed=options.retry_failed)
    limiter = Limits(cfg.limits)
    progress = Progress(scan.rows, reused.ok + reused.failed, enabled=cfg.run.progress and not options.quiet,
                        interval_s=cfg.run.progress_interval_s,
                        live=lambda: Live(invocation.tally.in_flight, limiter.paused_for(),
                                          invocation.tally.last_error))
    answers = LocalAnswers(store, _open_cache(cfg, stack), stats, retry_failed=options.retry_failed)
    core = Core(cfg, renderer, plan, answers=answers, limiter=limiter, transport=transport, progress=progress,
                stats=stats, budget=_budget(cfg, store, spent_before))
    return RunContext(cfg=cfg, options=options, invocation=invocation, jobdir=jobdir, source=prepared.source,
                      scan=scan, renderer=renderer, plan=plan, store=store, answers=answers, core=core,
                      progress=progress, interrupt=interrupt, columns=columns, names=names, reuse=reuse,
                      reused=reused, rows=RowCount(invocation.started, reused, answers.asked_again),
                      commands=prepared.commands,
                      started=prepared.started, spent_before=spent_before)


def _budget(cfg: Config, store: Store, spent_before: float) -> Budget:
    budget = Budget(cfg.budget.max_cost_usd, spent_before)
    budget.seed(store.get_meta(MARKUP_META))  # what earlier runs learned the endpoint bills over the table
    return budget


async def _drive_run(ctx: RunContext, transport: Transport) -> Summary:
    """Answer the rows under signals and a heartbeat, then write the outputs."""
    ctx.invocation.watch(lambda: figures(ctx.jobdir, ctx.total, ctx.progress, ctx.reused, ctx.core, ctx.invocation,
                                         ctx.spent_before))
    ctx.interrupt.attach(ctx.core, ctx.progress, ctx.cfg.run.grace_period_s, signals=ctx.options.handle_signals)
    heartbeat = asyncio.create_task(ctx.invocation.heartbeat(ctx.progress))
    try:
        batch_state = await _engine_pass(ctx, transport,
                                         lambda: ctx.source.batches(skip=lambda i: ctx.names[i] in ctx.reuse))
    finally:
        heartbeat.cancel()
        ctx.interrupt.detach()
        await transport.close()
        ctx.progress.close()
        _save_calibration(ctx.store, ctx.renderer, ctx.cfg.endpoint.model)
    return _outputs(ctx, batch_state)


async def _engine_pass(ctx: RunContext, transport: Transport, batches: Callable[[], Iterator[InputBatch]]
                       ) -> str | None:
    """Answer the rows (in batch mode the Batch API fills the store first, then this pass only writes)
    and write each batch's part files; returns the batch mode's state, None in sync mode."""
    batch_state = None
    if ctx.cfg.run.mode == "batch":
        from ..batch.mode import drive_batches
        batch_state = await drive_batches(ctx, transport, batches)
    if batch_state in (None, "collected"):
        await _drive(ctx.core, batches(), ctx.names, ctx.jobdir.parts, ctx.columns, ctx.store, ctx.rows)
    return batch_state


def _outputs(ctx: RunContext, batch_state: str | None) -> Summary:
    """results.parquet, failures.parquet and the summary with its exit code; published when asked."""
    ctx.store.sync()
    summary = dataclasses.replace(_summary(ctx), **ctx.invocation.stamp())
    finish(summary, ctx.core, *ctx.commands)
    summary.quality = quality_figures(ctx.jobdir.path, ctx.cfg)
    apply_gate(summary, ctx.cfg)
    if batch_state is not None:
        from ..batch.mode import finish as finish_batches
        finish_batches(summary, batch_state, ctx.commands[0])
    publish_outputs(ctx.cfg, ctx.jobdir.path, summary)
    return summary


def _open_store(cfg: Config, jobdir: JobDir, manifest: dict[str, Any], plan: StructuredPlan | None,
                renderer: Renderer, stack: contextlib.AsyncExitStack) -> Store:
    """The job's answer store, bound to the job, and what earlier runs learned into it."""
    store = stack.enter_context(contextlib.closing(
        Store(jobdir.store_path, fsync_interval_s=cfg.output.fsync_interval_s)))
    jobdir.bind_store(store, manifest)
    if plan is not None and (mode := store.get_meta("structured_mode")):
        plan.mode = mode  # an earlier run of this job already learned the model's structured mode
    renderer.tokens = counter_for(cfg.endpoint.model, store.get_meta(CALIBRATION_META))
    return store


def _parts_plan(jobdir: JobDir, manifest: dict[str, Any], store: Store, scan: InputScan, columns: OutputColumns,
                *, retry_failed: bool) -> tuple[list[str], set[str], PartCounts]:
    """Each batch's part name (its content and the part context), recorded for `pipeline status`; the
    parts that can be used as they are, and the rows they hold."""
    names = part_names(scan.digests, part_context(scan.carried_types, columns.id_column, columns))
    jobdir.record_input(manifest, scan.rows, names)
    drop_partial_parts(jobdir.parts)
    reuse, reused = jobdir.reusable(store, names, retry_failed=retry_failed)
    return names, reuse, reused


async def _drive(core: Core, batches: Iterator[InputBatch], names: list[str], parts: Path, columns: OutputColumns,
                 store: Store, rows: RowCount) -> None:
    """Feed the batches to the core and write each outcome batch as it comes."""
    try:
        async with contextlib.aclosing(core.outcomes(batches)) as outcomes:
            async for out in outcomes:
                rows.add(out)
                _write(out, names[out.index], parts, columns, store)
    except InputChangedError as exc:
        # Raised before a row of the new version was used: stop, keep what is answered, write no outputs.
        log.error("%s", exc, extra={"event": "stop", "reason": "input_changed"})
        core.stop("input_changed")
        raise


def _save_calibration(store: Store, renderer: Renderer, model: str) -> None:
    """What this run learned about the model's prompt tokens, for the next run and the dry run. Only a
    hint: a store that cannot take it (disk full) must not hide why the run ended."""
    try:
        store.set_meta(CALIBRATION_META, renderer.tokens.learned.to_json(model))
    except (OSError, sqlite3.Error) as exc:
        log.warning("could not keep the prompt-token calibration: %s", exc)


@contextlib.contextmanager
def _collector_tuned() -> Iterator[None]:
    """Rows create no reference cycles, but the default collector walks every live object (aiohttp, the
    open batches) thousands of times a run: freeze what set-up made and collect rarely (+34% req/s)."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _open_cache(cfg: Config, stack: contextlib.AsyncExitStack) -> Store | None:
    if not cfg.cache.dir:
        return None
    os.makedirs(cfg.cache.dir, exist_ok=True)
    path = os.path.join(cfg.cache.dir, "cache.sqlite")
    return stack.enter_context(contextlib.closing(Store(path, fsync_interval_s=cfg.output.fsync_interval_s)))


async def _endpoint_url(cfg: Config, stack: contextlib.AsyncExitStack) -> str:
    """endpoint.base_url, or the address of the built-in simulator started for this run."""
    if cfg.endpoint.base_url != "simulator":
        return cfg.endpoint.base_url
    from pipeline_simulator import SimConfig, Simulator
    sim = Simulator(SimConfig(**cfg.endpoint.simulator_options()))
    url = await sim.start()
    stack.push_async_callback(sim.stop)
    return url


def _http_transport(cfg: Config, base_url: str, api_key: str) -> HttpTransport:
    return HttpTransport(
        base_url, api_key, cfg.endpoint.request_headers(cfg.source), timeout_s=cfg.endpoint.timeout_s,
        read_timeout_s=cfg.endpoint.read_timeout_s, connect_timeout_s=cfg.endpoint.connect_timeout_s,
        pool_size=cfg.limits.max_concurrency)


def _output_columns(cfg: Config, plan: StructuredPlan | None) -> OutputColumns:
    return OutputColumns(
        id_column=cfg.input.id_column or "id", schema=plan.schema if plan else None,
        with_tool_calls=bool(cfg.params.tools), with_logprobs=bool(cfg.params.logprobs),
        with_ttft=cfg.params.stream, compression=cfg.output.compression,
        cost_unknown=find_price(cfg, cfg.endpoint.model) is None,
        **quality_layout(cfg, plan.schema if plan else None),
    )


def _write(out: OutcomeBatch, name: str, parts: Path, columns: OutputColumns, store: Store) -> None:
    """One batch's part files; a batch with pending rows (a stop) is partial and stays open."""
    ok, bad = write_part(parts, name, columns, out.batch.carried, out.outcomes)
    if out.complete:
        # Indexed after the files are in place; a kill in between costs one footer read on resume.
        failed = [o for o in out.outcomes if isinstance(o, Record) and o.state != "ok"]
        store.put_part(part_number(name), ok=ok, failed=bad, request_failed=len(failed),
                       failed_transient=sum(1 for o in failed if o.state == "transient"))


def _summary(ctx: RunContext) -> Summary:
    cfg, jobdir, store, plan, progress = ctx.cfg, ctx.jobdir, ctx.store, ctx.plan, ctx.progress
    previous_ids = output_ids(jobdir.path, cfg.input.id_column or "id")
    ctx.rows.settle(ctx.total, previous_ids, derived_ids=cfg.input.id_column is None)
    succeeded, failed = merge_parts(jobdir.parts, jobdir.path, cfg.output.compression, ctx.names)
    progress.finish(succeeded + failed, failed, ctx.core.stats)  # the bar's last frame shows the summary's figures
    jobdir.prune(store, ctx.names)
    totals = store.totals()
    stats, rows = ctx.core.stats, ctx.total
    return Summary(
        out_dir=str(jobdir.path), rows_total=rows, succeeded=succeeded, failed=failed,
        pending=rows - succeeded - failed, prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"], cost_usd=round(totals["cost_usd"], 6),
        run_cost_usd=round(stats.cost_usd, 6), wall_s=round(time.monotonic() - ctx.started, 3),
        requests_sent=stats.requests_sent, retries=dict(stats.retries),
        failures_by_class=failure_counts(jobdir.path), cache_hits=stats.cache_hits,
        deduplicated=stats.deduplicated, resumed_rows=ctx.reused.ok + ctx.reused.failed,
        rows_new=ctx.rows.new, rows_edited=ctx.rows.edited, rows_retried=ctx.rows.retried,
        rows_reused=ctx.rows.reused, rows_input_failed=ctx.rows.input_failed,
        rows_removed=ctx.source.count_missing(previous_ids),
        config_fingerprint=cfg.request_fingerprint(), versions=versions(),
        structured={"mode": plan.mode, "notes": plan.notes, "fallbacks": plan.fallbacks} if plan else {},
        prompt_cache=prompt_cache_figures(cfg, store.cache_totals(), totals["prompt_tokens"], stats),
    )
