"""Ties the stages together: input batches -> requests -> dispatch -> parts -> outputs -> Summary.

`process(batches)` is the engine: it turns an iterator of input batches into part files and never owns
where the input comes from, so another driver (Ray Data, a notebook loop) can call it per block.
`run_async` owns one job folder from lock to summary; `run` is the sync wrapper and also works inside an
already running event loop (Jupyter) by running the job on a private loop in a worker thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import os
import platform
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..send.dispatch import Dispatcher, Job, Stopped
from ..errors import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, RowError
from ..send.limits import Limits
from ..write.output import (
    Layout,
    RowFailure,
    Summary,
    drop_partial_parts,
    failure_counts,
    merge_parts,
    write_json_atomic,
    write_part,
)
from .progress import Progress
from ..build.prompts import Renderer, estimate_prompt_tokens, finalize
from ..read.reader import InputBatch, Source
from ..state.jobdir import JobDir, resume_command
from ..state.store import FINAL_STATES, Record, Store
from ..build.structured import StructuredPlan, plan_for
from ..send.transport import HttpTransport, Transport

log = logging.getLogger("pipeline")

# Unfinished batches held at once: enough to keep every concurrency slot busy while a straggler retries.
MAX_OPEN_BATCHES = 4


class Engine:
    """Renders, dispatches and writes the parts of one job; knows nothing of files or signals."""

    def __init__(self, cfg: Config, dispatcher: Dispatcher, renderer: Renderer, plan: StructuredPlan | None,
                 store: Store, layout: Layout, parts_dir: Path, progress: Progress, *, retry_failed: bool,
                 cache: Store | None = None) -> None:
        self.cfg, self.dispatcher, self.renderer, self.plan = cfg, dispatcher, renderer, plan
        self.store, self.cache, self.layout, self.parts_dir = store, cache, layout, parts_dir
        self.progress, self.retry_failed = progress, retry_failed
        self.request_tasks: set[asyncio.Task[Record]] = set()
        self.failed_rows = 0
        self.keep_states: frozenset[str] | None = None  # batch mode: which stored states count as answered

    async def process(self, batches: Iterable[InputBatch]) -> None:
        window = asyncio.Semaphore(max(MAX_OPEN_BATCHES, -(-self.cfg.limits.max_concurrency * 2 // self.cfg.input.batch_size)))
        pending: set[asyncio.Task[None]] = set()
        for batch in batches:
            await window.acquire()
            if self.dispatcher.stop_reason:
                window.release()
                break
            task = asyncio.create_task(self._batch(batch))
            pending.add(task)
            task.add_done_callback(lambda t: (pending.discard(t), window.release()))
            # Let the batch render and dispatch before reading the next one.
            await asyncio.sleep(0)
        while pending:
            await asyncio.gather(*list(pending), return_exceptions=False)

    async def _batch(self, batch: InputBatch) -> None:
        outcomes, row_keys, jobs = render_batch(batch, self.renderer, self.plan, self.cfg.endpoint.base_url)
        records = self._known(jobs)
        rows_per_key = Counter(k for k in row_keys if k is not None)
        self.dispatcher.stats.deduplicated += sum(rows_per_key.values()) - len(rows_per_key)
        input_failed = sum(1 for o in outcomes if o is not None)
        self._rows_done(input_failed + sum(rows_per_key[k] for k in records),
                        input_failed + sum(rows_per_key[k] for k, r in records.items() if r.state != "ok"))
        todo = [job for key, job in jobs.items() if key not in records]
        if todo:
            tasks = [asyncio.create_task(self.dispatcher.submit(job)) for job in todo]
            for job, task in zip(todo, tasks):
                task.add_done_callback(functools.partial(self._answered, rows_per_key[job.key]))
            self.request_tasks.update(tasks)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self.request_tasks.difference_update(tasks)
            for job, res in zip(todo, results):
                if isinstance(res, Record):
                    records[job.key] = res
                elif not isinstance(res, (Stopped, asyncio.CancelledError)):
                    raise res  # a bug, not an outcome: surface it
        for i, key in enumerate(row_keys):
            if key is not None and key in records:
                outcomes[i] = records[key]
        # Rows still None were stopped before an answer: the part is partial and the batch stays open.
        ok, bad = write_part(self.parts_dir, batch.index, self.layout, batch.carried, outcomes)
        if ok + bad == len(outcomes):
            # Indexed after the files are in place; a kill in between costs one footer read on resume.
            failed = [o for o in outcomes if isinstance(o, Record) and o.state != "ok"]
            self.store.put_part(batch.index, ok=ok, failed=bad, request_failed=len(failed),
                                transient=sum(1 for o in failed if o.state == "transient"))

    def _answered(self, rows: int, task: asyncio.Task[Record]) -> None:
        """The bar moves as answers arrive, not when a whole batch is written."""
        if not task.cancelled() and task.exception() is None:
            self._rows_done(rows, rows if task.result().state != "ok" else 0)

    def _rows_done(self, rows: int, failed: int) -> None:
        if rows:
            self.failed_rows += failed
            self.progress.advance(rows, self.dispatcher.stats, self.failed_rows)

    def _known(self, jobs: dict[str, Job]) -> dict[str, Record]:
        """Answers already paid for: this job's store first, then the shared cache."""
        found = self.store.get_many(jobs.keys())
        keep = self.keep_states or ({"ok"} if self.retry_failed else FINAL_STATES)
        records = {k: r for k, r in found.items() if r.state in keep}
        if self.cache is not None:
            missing = [k for k in jobs if k not in records]
            hits = [r for r in self.cache.get_many(missing, with_raw=True).values() if r.state == "ok"] if missing else []
            for r in hits:
                r.cache_hit, r.cost_usd, r.created_at = True, 0.0, 0.0
            if hits:
                self.store.put_now(hits)
                self.dispatcher.stats.cache_hits += len(hits)
                records.update({r.key: r for r in hits})
        return records


def render_batch(batch: InputBatch, renderer: Renderer, plan: StructuredPlan | None, base_url: str
                 ) -> tuple[list[Record | RowFailure | None], list[str | None], dict[str, Job]]:
    """Each row's outcome so far (input failures), its request key, and one Job per distinct key.

    Module-level so that tools which must predict request keys exactly (benchmarks/resume_scale.py)
    use the very code the runner uses."""
    n = len(batch.rows)
    outcomes: list[Record | RowFailure | None] = [None] * n
    row_keys: list[str | None] = [None] * n
    jobs: dict[str, Job] = {}
    for i, row in enumerate(batch.rows):
        err = batch.errors[i]
        if err is None:
            try:
                draft = renderer.render(row, batch.origins[i])
            except RowError as exc:
                err = exc
        if err is not None:
            outcomes[i] = RowFailure("input", str(err))
            continue
        body = plan.shape(draft.body) if plan is not None else draft.body
        payload, key = finalize(body, base_url)
        row_keys[i] = key
        if key not in jobs:
            text_tokens = estimate_prompt_tokens(draft.body)
            image_tokens = draft.est_prompt_tokens - text_tokens
            # Shaping adds the schema (tools or system prompt) to what is sent: estimate what is sent.
            est = estimate_prompt_tokens(body, image_tokens) if plan is not None else draft.est_prompt_tokens
            jobs[key] = Job(key, payload, draft.body, est, draft.max_tokens, _count_images(draft.body),
                            image_tokens=image_tokens, mode=plan.mode if plan else None)
    return outcomes, row_keys, jobs


def _count_images(body: dict[str, Any]) -> int:
    count = 0
    for msg in body.get("messages", ()):
        content = msg.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
    return count


async def run_async(cfg: Config, *, retry_failed: bool = False, force_new: bool = False,
                    schema: dict[str, Any] | None = None, quiet: bool = False, handle_signals: bool = False,
                    transport: Transport | None = None, config_path: str | None = None,
                    overrides: list[str] | None = None, interrupt: Interrupt | None = None,
                    no_wait: bool = False, cancel_batches: bool = False) -> Summary:
    """Run one job to completion, stop or interruption; never raises for row-level problems.

    `config_path` and `overrides` (the --set items) are only used to print the command that resumes;
    `interrupt` lets another thread stop the run as Ctrl-C would (see `run`). `no_wait` and
    `cancel_batches` apply to run.mode: batch (submit and return; cancel the job's batches)."""
    started = time.monotonic()
    config_path = config_path or cfg.source
    command = resume_command(config_path, overrides, retry_failed=retry_failed)
    if schema is not None:  # into the config, so the job fingerprint covers the schema actually asked for
        cfg = load_config(cfg, {"structured.schema": schema})
    jobdir = JobDir(cfg.output.dir)
    jobdir.adopt_batch_size(cfg)  # before the scan: it records where each batch starts
    source = Source(cfg.input)
    scan = source.scan()
    renderer = Renderer(cfg, input_dir=str(Path(source.files[0]).parent) if source.files else None,
                        columns=scan.columns)
    plan = plan_for(cfg, schema)
    api_key = cfg.api_key()
    jobdir.lock()
    sim = None
    store = cache = None
    gc_threshold = gc.get_threshold()
    # Rows create no reference cycles, but the default collector walks every live object (aiohttp, the open
    # batches) thousands of times a run: freeze what set-up made and collect rarely (measured +34% req/s).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        jobdir.check_job(cfg, scan, force_new=force_new, config_path=config_path, command=command)
        store = Store(jobdir.store_path, fsync_interval_s=cfg.output.fsync_interval_s)
        if plan is not None and (mode := store.get_meta("structured_mode")):
            plan.mode = mode  # an earlier run of this job already learned the model's structured mode
        if cfg.cache.dir:
            os.makedirs(cfg.cache.dir, exist_ok=True)
            cache = Store(os.path.join(cfg.cache.dir, "cache.sqlite"), fsync_interval_s=cfg.output.fsync_interval_s)
        base_url = cfg.endpoint.base_url
        if base_url == "simulator":
            from ..simulator import SimConfig, Simulator
            sim = Simulator(SimConfig(**cfg.endpoint.simulator))
            base_url = await sim.start()
        transport = transport or HttpTransport(
            base_url, api_key, cfg.endpoint.request_headers(), timeout_s=cfg.endpoint.timeout_s,
            read_timeout_s=cfg.endpoint.read_timeout_s, connect_timeout_s=cfg.endpoint.connect_timeout_s,
            pool_size=cfg.limits.max_concurrency,
        )
        spent_before = store.totals()["cost_usd"]
        dispatcher = Dispatcher(cfg, transport, store, Limits(cfg.limits), plan, cache=cache, spent_before=spent_before)
        layout = Layout(
            id_column=cfg.input.id_column or "id", schema=plan.schema if plan else None,
            with_tool_calls=bool(cfg.params.tools), with_logprobs=bool(cfg.params.logprobs),
            with_ttft=cfg.params.stream, compression=cfg.output.compression,
        )
        drop_partial_parts(jobdir.parts)
        done, resumed = jobdir.resume_plan(store, retry_failed=retry_failed)
        progress = Progress(scan.rows, resumed, enabled=cfg.run.progress and not quiet)
        engine = Engine(cfg, dispatcher, renderer, plan, store, layout, jobdir.parts, progress,
                        retry_failed=retry_failed, cache=cache)
        interrupt = interrupt or Interrupt()
        interrupt.attach(dispatcher, engine, cfg.run.grace_period_s, signals=handle_signals)
        batch_state = None
        try:
            if cfg.run.mode == "batch":
                from ..batch.mode import drive_batches
                batch_state = await drive_batches(
                    cfg, str(jobdir.path / "batch"), engine, transport, lambda: source.batches(skip=done.__contains__),
                    lambda b: render_batch(b, renderer, plan, cfg.endpoint.base_url)[2], no_wait=no_wait,
                    cancel=cancel_batches, progress=progress.enabled)
            if batch_state in (None, "collected"):
                await engine.process(source.batches(skip=done.__contains__))
        finally:
            interrupt.detach()
            progress.close()
            await transport.close()
        store.sync()
        succeeded, failed = merge_parts(jobdir.parts, jobdir.path, cfg.output.compression)
        totals = store.totals()
        summary = Summary(
            out_dir=str(jobdir.path), rows_total=scan.rows, succeeded=succeeded, failed=failed,
            pending=scan.rows - succeeded - failed, prompt_tokens=totals["prompt_tokens"],
            completion_tokens=totals["completion_tokens"], cost_usd=round(totals["cost_usd"], 6),
            run_cost_usd=round(dispatcher.stats.cost_usd, 6), wall_s=round(time.monotonic() - started, 3),
            requests_sent=dispatcher.stats.requests_sent, retries=dict(dispatcher.stats.retries),
            failures_by_class=failure_counts(jobdir.path), cache_hits=dispatcher.stats.cache_hits,
            deduplicated=dispatcher.stats.deduplicated, resumed_rows=resumed,
            config_fingerprint=cfg.request_fingerprint(), versions=_versions(),
            structured={"mode": plan.mode, "notes": plan.notes, "fallbacks": plan.fallbacks} if plan else {},
        )
        _finish(summary, dispatcher, command, resume_command(config_path, overrides, retry_failed=True))
        if batch_state is not None:
            from ..batch.mode import finish
            finish(summary, batch_state, command)
        write_json_atomic(jobdir.path / "summary.json", summary.to_json())
        return summary
    finally:
        if sim is not None:
            await sim.stop()
        if cache is not None:
            cache.close()
        if store is not None:
            store.close()
        jobdir.unlock()
        gc.set_threshold(*gc_threshold)
        gc.unfreeze()


def _finish(summary: Summary, dispatcher: Dispatcher, resume: str, retry: str) -> None:
    reason = dispatcher.stop_reason
    if reason in ("fatal", "budget") and dispatcher.fatal is not None:
        summary.stopped, summary.exit_code = reason, EXIT_STOPPED
        summary.stop_message = str(dispatcher.fatal)
        summary.next_step = f"{dispatcher.fatal.hint}: {resume}"
    elif reason == "interrupted":
        summary.stopped, summary.exit_code = "interrupted", EXIT_INTERRUPTED
        summary.next_step = f"resume with: {resume}"
    elif summary.pending:
        summary.stopped, summary.exit_code = "incomplete", EXIT_STOPPED
        summary.next_step = f"some rows have no answer yet; resume with: {resume}"
    else:
        summary.exit_code = EXIT_FAILED_ROWS if summary.failed else EXIT_OK
        if summary.failed:
            summary.next_step = f"see failures.parquet; retry failed rows with: {retry}"


class Interrupt:
    """Ctrl-C and SIGTERM for one run, also when triggered from another thread (a notebook's Ctrl-C).

    First: stop dispatching and let requests in flight finish within the grace period, then write
    the outputs for what is done. Second: cancel the requests in flight now; answers already received
    are still committed (the store's pending group commit runs on cancellation too), so the store
    stays consistent. Signal handlers are installed only in the main thread (the event loop can only
    handle signals there) and the previous handlers are put back afterwards.
    """

    def __init__(self) -> None:
        self.hits = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: Dispatcher | None = None
        self._engine: Engine | None = None
        self._grace_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._previous: dict[int, Any] = {}

    def attach(self, dispatcher: Dispatcher, engine: Engine, grace_s: float, *, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._dispatcher, self._engine, self._grace_s = dispatcher, engine, grace_s
        if signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                self._loop.add_signal_handler(sig, self.trigger)
        if self.hits:  # Ctrl-C came while the job was still starting
            self._apply(self.hits)

    def trigger(self) -> None:
        """Called on the run's event loop (signal handler)."""
        self.hits += 1
        if self._dispatcher is not None:
            self._apply(self.hits)

    def trigger_threadsafe(self) -> None:
        """Called from any thread; before the run is attached, it is remembered and applied on attach."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.hits += 1
            return
        try:
            loop.call_soon_threadsafe(self.trigger)
        except RuntimeError:  # the loop closed meanwhile: the run is over
            pass

    def _apply(self, hits: int) -> None:
        assert self._dispatcher is not None and self._engine is not None and self._loop is not None
        self._dispatcher.stop("interrupted")
        if hits == 1:
            text = (f"stopping: finishing requests in flight (up to {self._grace_s:g}s); "
                    "Ctrl-C again to stop now")
            if self._engine.progress.enabled:
                self._engine.progress.note(text)
            else:
                log.warning("%s", text)
            self._timer = self._loop.call_later(self._grace_s, self._hard_stop)
        else:
            self._hard_stop()

    def _hard_stop(self) -> None:
        assert self._engine is not None
        for task in list(self._engine.request_tasks):
            task.cancel()

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            for sig, previous in self._previous.items():
                self._loop.remove_signal_handler(sig)
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._dispatcher = self._engine = None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llm-batch-pipeline", "aiohttp", "polars", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(config: str | os.PathLike[str] | dict[str, Any] | Config, *, retry_failed: bool = False,
        force_new: bool = False, quiet: bool = False, schema: Any = None, set: list[str] | None = None,
        no_wait: bool = False, cancel_batches: bool = False, **overrides: Any) -> Summary:
    """Run a job from a config path, dict or Config; keyword overrides use dotted paths with `__`
    (`output__dir="/tmp/x"`) or section dicts (`limits={"max_concurrency": 8}`). A pydantic model
    class may be given as `schema`. `no_wait` / `cancel_batches`: run.mode: batch (see run_async)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        else:
            flat[key.replace("__", ".")] = value
    cfg = load_config(config if not isinstance(config, os.PathLike) else str(config), set or flat or None)
    if set and flat:
        cfg = load_config(cfg, flat)
    schema_dict = None
    if schema is not None:
        from ..build.schema import from_pydantic
        schema_dict = schema if isinstance(schema, dict) else from_pydantic(schema)
        if cfg.structured is None:
            cfg = load_config(cfg, {"structured.schema": schema_dict})
    interrupt = Interrupt()
    coro_factory = lambda: run_async(cfg, retry_failed=retry_failed, force_new=force_new,  # noqa: E731
                                     schema=schema_dict, quiet=quiet, interrupt=interrupt, no_wait=no_wait,
                                     cancel_batches=cancel_batches)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())  # Ctrl-C: KeyboardInterrupt, after the store is closed
    # Inside a running loop (Jupyter): a private loop in a worker thread; block this cell until done.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as pool:
        future = pool.submit(lambda: asyncio.run(coro_factory()))
        while True:
            try:
                # Wake up now and then: a signal handled by another thread does not interrupt a blocked
                # wait, and Python runs the KeyboardInterrupt handler only when this thread runs.
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
            except KeyboardInterrupt:
                # Interrupting the cell stops the job as Ctrl-C stops the CLI (a second time: at once) and
                # returns its summary, instead of leaving it running behind the cell with the lock held.
                interrupt.trigger_threadsafe()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("schema", "headers", "extra", "simulator", "provider"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
