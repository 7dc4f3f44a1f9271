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
from ..errors import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, InputChangedError, RowError
from ..send.limits import Limits
from ..write.output import (
    Layout,
    RowFailure,
    Summary,
    drop_partial_parts,
    failure_counts,
    merge_parts,
    output_ids,
    write_json_atomic,
    write_part,
)
from ..ops.invocation import Invocation
from ..ops.metrics import Figures, ObservedTransport, Tally
from .progress import Live, Progress
from ..build.prompts import Renderer, estimate_prompt_tokens, finalize
from ..read.frames import frame_file
from ..read.reader import InputBatch, Source
from ..state.jobdir import JobDir, part_context, part_names, part_number, resume_command
from ..state.store import FINAL_STATES, PartCounts, Record, Store
from ..build.structured import StructuredPlan, plan_for
from ..send.transport import HttpTransport, Transport

log = logging.getLogger("pipeline")

# Unfinished batches held at once: enough to keep every concurrency slot busy while a straggler retries.
MAX_OPEN_BATCHES = 4


class Engine:
    """Renders, dispatches and writes the parts of one job; knows nothing of files or signals."""

    def __init__(self, cfg: Config, dispatcher: Dispatcher, renderer: Renderer, plan: StructuredPlan | None,
                 store: Store, layout: Layout, parts_dir: Path, progress: Progress, *, retry_failed: bool,
                 names: list[str], cache: Store | None = None) -> None:
        self.cfg, self.dispatcher, self.renderer, self.plan = cfg, dispatcher, renderer, plan
        self.store, self.cache, self.layout, self.parts_dir = store, cache, layout, parts_dir
        self.progress, self.retry_failed, self.names = progress, retry_failed, names
        self.request_tasks: set[asyncio.Task[Record]] = set()
        self.failed_rows = self.rows_done = 0
        # Rows of the batches read: whose request had no answer when the run started (sent now, or still
        # pending), and whose request was answered before (in the store or the cache). Bad input rows have
        # no request and are neither.
        self.rows_new = self.rows_reused = 0

    async def process(self, batches: Iterable[InputBatch]) -> None:
        window = asyncio.Semaphore(max(MAX_OPEN_BATCHES, -(-self.cfg.limits.max_concurrency * 2 // self.cfg.input.batch_size)))
        pending: set[asyncio.Task[None]] = set()
        try:
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
        except InputChangedError as exc:
            # The batches already read are of the version the scan saw: let them finish, then stop.
            log.error("%s", exc, extra={"event": "stop", "reason": "input_changed"})
            self.dispatcher.stop("input_changed")
            while pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
            raise
        while pending:
            await asyncio.gather(*list(pending), return_exceptions=False)

    async def _batch(self, batch: InputBatch) -> None:
        outcomes, row_keys, jobs = render_batch(batch, self.renderer, self.plan, self.cfg.endpoint.base_url)
        records = self._known(jobs)
        rows_per_key = Counter(k for k in row_keys if k is not None)
        self.dispatcher.stats.deduplicated += sum(rows_per_key.values()) - len(rows_per_key)
        new = sum(n for k, n in rows_per_key.items() if k not in records)
        self.rows_new += new
        self.rows_reused += sum(rows_per_key.values()) - new
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
        name = self.names[batch.index]
        ok, bad = write_part(self.parts_dir, name, self.layout, batch.carried, outcomes)
        if ok + bad == len(outcomes):
            # Indexed after the files are in place; a kill in between costs one footer read on resume.
            failed = [o for o in outcomes if isinstance(o, Record) and o.state != "ok"]
            self.store.put_part(part_number(name), ok=ok, failed=bad, request_failed=len(failed),
                                transient=sum(1 for o in failed if o.state == "transient"))

    def _answered(self, rows: int, task: asyncio.Task[Record]) -> None:
        """The bar moves as answers arrive, not when a whole batch is written."""
        if not task.cancelled() and task.exception() is None:
            self._rows_done(rows, rows if task.result().state != "ok" else 0)

    def _rows_done(self, rows: int, failed: int) -> None:
        if rows:
            self.rows_done += rows
            self.failed_rows += failed
            self.progress.advance(rows, self.dispatcher.stats, self.failed_rows)

    def _known(self, jobs: dict[str, Job]) -> dict[str, Record]:
        """Answers already paid for: this job's store first, then the shared cache."""
        found = self.store.get_many(jobs.keys())
        keep = {"ok"} if self.retry_failed else FINAL_STATES
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
                    overrides: list[str] | None = None, interrupt: Interrupt | None = None) -> Summary:
    """Run one job to completion, stop or interruption; never raises for row-level problems.

    `config_path` and `overrides` (the --set items) are only used to print the command that resumes;
    `interrupt` lets another thread stop the run as Ctrl-C would (see `run`). Every invocation, refused
    and failed ones included, is one record in output.dir/history.jsonl (ops/invocation.py)."""
    if schema is not None:  # into the config, so the job fingerprint covers the schema actually asked for
        cfg = load_config(cfg, {"structured.schema": schema})
    invocation = Invocation(cfg)
    try:
        summary = await _run_job(cfg, invocation, schema, retry_failed=retry_failed, force_new=force_new, quiet=quiet,
                                 handle_signals=handle_signals, transport=transport,
                                 config_path=config_path or cfg.source, overrides=overrides, interrupt=interrupt)
    except BaseException as exc:
        await invocation.finish(None, exc)
        raise
    await invocation.finish(summary, None)
    return summary


async def _run_job(cfg: Config, invocation: Invocation, schema: dict[str, Any] | None, *, retry_failed: bool, force_new: bool, quiet: bool,
                   handle_signals: bool, transport: Transport | None, config_path: str,
                   overrides: list[str] | None, interrupt: Interrupt | None) -> Summary:
    started = time.monotonic()
    command = resume_command(config_path, overrides, retry_failed=retry_failed, out_dir=cfg.output.dir)
    jobdir = JobDir(cfg.output.dir)
    jobdir.lock()
    sim = None
    store = cache = None
    gc_threshold = gc.get_threshold()
    # Rows create no reference cycles, but the default collector walks every live object (aiohttp, the open
    # batches) thousands of times a run: freeze what set-up made and collect rarely (measured +34% req/s).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        invocation.attach(jobdir.path)
        manifest = jobdir.check_job(cfg, force_new=force_new, config_path=config_path, command=command)
        source = Source(cfg.input)  # after check_job: the job keeps the batch size it started with
        scan = source.scan()
        renderer = Renderer(cfg, input_dir=str(Path(source.files[0]).parent) if source.files else None,
                            columns=scan.columns)
        plan = plan_for(cfg, schema)
        api_key = cfg.api_key()
        store = Store(jobdir.store_path, fsync_interval_s=cfg.output.fsync_interval_s)
        jobdir.bind_store(store, manifest)
        spent_before = store.totals()["cost_usd"]
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
        transport = ObservedTransport(transport, invocation.tally)
        dispatcher = Dispatcher(cfg, transport, store, Limits(cfg.limits), plan, cache=cache,
                                spent_before=spent_before)
        layout = Layout(
            id_column=cfg.input.id_column or "id", schema=plan.schema if plan else None,
            with_tool_calls=bool(cfg.params.tools), with_logprobs=bool(cfg.params.logprobs),
            with_ttft=cfg.params.stream, compression=cfg.output.compression,
        )
        names = part_names(scan.digests, part_context(scan.carried_types, layout.id_column, layout))
        jobdir.record_input(manifest, scan.rows, names)
        drop_partial_parts(jobdir.parts)
        reuse, reused = jobdir.reusable(store, names, retry_failed=retry_failed)
        resumed = reused.ok + reused.failed
        progress = Progress(scan.rows, resumed, enabled=cfg.run.progress and not quiet,
                            interval_s=cfg.run.progress_interval_s, live=lambda: _live(invocation.tally, dispatcher))
        engine = Engine(cfg, dispatcher, renderer, plan, store, layout, jobdir.parts, progress,
                        retry_failed=retry_failed, names=names, cache=cache)
        invocation.watch(lambda: _figures(jobdir, scan.rows, reused, engine, dispatcher, invocation, spent_before))
        interrupt = interrupt or Interrupt()
        interrupt.attach(dispatcher, engine, cfg.run.grace_period_s, signals=handle_signals)
        heartbeat = asyncio.create_task(invocation.heartbeat(progress))
        try:
            await engine.process(source.batches(skip=lambda i: names[i] in reuse))
        finally:
            heartbeat.cancel()
            interrupt.detach()
            await transport.close()
            progress.close()
        store.sync()
        previous_ids = output_ids(jobdir.path, layout.id_column)
        succeeded, failed = merge_parts(jobdir.parts, jobdir.path, cfg.output.compression, names)
        progress.finish(succeeded + failed, failed, dispatcher.stats)
        jobdir.prune(store, names)
        totals = store.totals()
        summary = Summary(
            out_dir=str(jobdir.path), rows_total=scan.rows, succeeded=succeeded, failed=failed,
            pending=scan.rows - succeeded - failed, prompt_tokens=totals["prompt_tokens"],
            completion_tokens=totals["completion_tokens"], cost_usd=round(totals["cost_usd"], 6),
            run_cost_usd=round(dispatcher.stats.cost_usd, 6), wall_s=round(time.monotonic() - started, 3),
            requests_sent=dispatcher.stats.requests_sent, retries=dict(dispatcher.stats.retries),
            failures_by_class=failure_counts(jobdir.path), cache_hits=dispatcher.stats.cache_hits,
            deduplicated=dispatcher.stats.deduplicated, resumed_rows=resumed,
            rows_new=engine.rows_new, rows_reused=reused.ok + reused.request_failed + engine.rows_reused,
            rows_removed=source.count_missing(previous_ids),
            config_fingerprint=cfg.request_fingerprint(), versions=_versions(),
            structured={"mode": plan.mode, "notes": plan.notes, "fallbacks": plan.fallbacks} if plan else {},
            **invocation.stamp(),
        )
        _finish(summary, dispatcher, command,
                resume_command(config_path, overrides, retry_failed=True, out_dir=cfg.output.dir))
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


def _live(tally: Tally, dispatcher: Dispatcher) -> Live:
    return Live(tally.in_flight, dispatcher.limits.paused_for(), tally.last_error)


def _figures(jobdir: JobDir, rows: int, reused: PartCounts, engine: Engine, dispatcher: Dispatcher,
             invocation: Invocation, spent_before: float) -> Figures:
    """The job's figures now, for the metrics file (rows in reused parts plus rows answered this run)."""
    failed = reused.failed + engine.failed_rows
    done = reused.ok + reused.failed + engine.rows_done
    s, t = dispatcher.stats, invocation.tally
    return Figures(job=str(jobdir.path), rows={"succeeded": done - failed, "failed": failed, "pending": rows - done},
                   requests=dict(t.by_class), rate_limited=t.rate_limited, prompt_tokens=s.prompt_tokens,
                   completion_tokens=s.completion_tokens, run_cost_usd=s.cost_usd,
                   job_cost_usd=spent_before + s.cost_usd, last_success=t.last_success,
                   started=invocation.started, running=True)


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
        **overrides: Any) -> Summary:
    """Run a job from a config path, dict or Config; keyword overrides use dotted paths with `__`
    (`output__dir="/tmp/x"`) or section dicts (`limits={"max_concurrency": 8}`). A pydantic model
    class may be given as `schema`, and the input as `input=` a polars/pandas DataFrame or an Arrow
    table (read/frames.py) instead of `input.path`."""
    data = overrides.get("input")
    if data is not None and not isinstance(data, dict):
        rest = {k: v for k, v in overrides.items() if k != "input"}
        with frame_file(data) as path:
            return run(config, retry_failed=retry_failed, force_new=force_new, quiet=quiet, schema=schema, set=set,
                       input={"path": path, "format": "parquet"}, **rest)
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
                                     schema=schema_dict, quiet=quiet, interrupt=interrupt)
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
