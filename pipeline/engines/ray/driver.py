"""The Ray engine's driver: `run.engine: ray` runs one job as a Ray Data pipeline over shards.

Plan (engines/ray/plan.py): the driver takes the job's lease on the output location (lease.py), scans
the input once (the same reader, ids, checks, batch digests and job identity as the local engine),
names each shard (a local engine batch) after its content, prunes the parts of shards the input no
longer has, and maps the shards without a published part through `run.workers` ShardWorker actors
(`map_batches(..., compute=ActorPoolStrategy(size=workers))`, one shard per call). Limits and the
budget are shared through one limiter actor; answers go to the journal in output.dir
(state/segments.py); parts are published per shard. The driver owns no answer: killing it loses nothing
committed, and the same command resumes. Every invocation is one line in history.jsonl, with
pipeline.log (driver and workers), the metrics file and the webhook (invocation.py).
Layout, commit protocol and loss bound: docs/ray.md.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ...config import Config
from ...core.finish import Verdict, finish
from ...core.progress import Progress
from ...errors import ConfigError, RunFatalError
from ...ops.figures import Figures
from ...prepare.structured import plan_for
from ...read import storage
from ...read.reader import InputScan, Source
from ...send.stats import Stats
from ...state.jobdir import part_context, part_names, resume_command
from ...write.output import Summary
from .budget import read_spent, write_spent
from .invocation import RayInvocation
from .lease import Lease
from .limiter import LimiterActor
from .plan import FAILURES, RESULTS, RayJob
from .status import STATUS_FILE, count_rows
from .worker import Secret, ShardWorker, make_layout

NAMESPACE = "pipeline"
HEARTBEAT_S = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("run.engine: ray needs Ray: pip install 'llm-batch-pipeline[ray]'", key="run.engine") from None
    return ray


def connect(ray: Any, cfg: Config) -> None:
    """Join the configured cluster, start a local instance, or use the one this process already has."""
    if not ray.is_initialized():
        ray.init(address=cfg.run.ray_address, namespace=NAMESPACE, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)


def limiter_name(cfg: Config) -> str:
    """One limiter per job (output location), found by name in the `pipeline` namespace."""
    return "pipeline-limiter-" + hashlib.sha256(cfg.output.dir.encode()).hexdigest()[:12]


def start_limiter(ray: Any, cfg: Config, spent_before: float = 0.0) -> Any:
    return ray.remote(LimiterActor).options(
        name=limiter_name(cfg), namespace=NAMESPACE, num_cpus=0, max_concurrency=10_000, max_restarts=-1,
        get_if_exists=True).remote(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute, cfg.limits.burst_s,
                                   cfg.limits.input_tokens_per_minute, cfg.limits.output_tokens_per_minute,
                                   budget=(cfg.budget.max_cost_usd, spent_before, cfg.output.dir,
                                           cfg.output.storage_options))


@dataclass
class Gathered:
    """What the workers reported, summed over the shards finished so far."""

    stats: Stats = field(default_factory=Stats)
    rows: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "pending": 0, "reused": 0,
                                                          "new": 0, "edited": 0, "input_failed": 0})
    stop: str = ""
    message: str = ""
    finished: dict[str, np.ndarray] = field(default_factory=dict)  # shard -> its rows' id hashes
    shards_done: int = 0


def run_ray(cfg: Config, *, retry_failed: bool = False, force_new: bool = False,
            schema: dict[str, Any] | None = None, quiet: bool = False, config_path: str | None = None,
            overrides: list[str] | None = None, clock: Callable[[], float] = time.time) -> Summary:
    """One invocation; `clock` is the lease's (tests move it instead of waiting for an expiry)."""
    ray = import_ray()
    invocation = RayInvocation(cfg)
    try:
        summary = _run(ray, cfg, invocation, retry_failed=retry_failed, force_new=force_new, schema=schema,
                       quiet=quiet, config_path=config_path or cfg.source, overrides=overrides, clock=clock)
    except BaseException as exc:
        asyncio.run(invocation.finish(None, exc))
        raise
    asyncio.run(invocation.finish(summary, None))
    return summary


def _run(ray: Any, cfg: Config, invocation: RayInvocation, *, retry_failed: bool, force_new: bool,
         schema: dict[str, Any] | None, quiet: bool, config_path: str, overrides: list[str] | None,
         clock: Callable[[], float]) -> Summary:
    started = time.monotonic()
    commands = (resume_command(config_path, overrides, retry_failed=retry_failed, out_dir=cfg.output.dir),
                resume_command(config_path, overrides, retry_failed=True, out_dir=cfg.output.dir))
    cfg.api_key()  # a missing key is a usage error here, before anything starts
    cfg.endpoint.secret_header_values(cfg.source)  # so is a missing secret header
    job = RayJob(cfg)
    job.adopt_batch_size(cfg)
    source = Source(cfg.input)
    scan = source.scan()
    layout = make_layout(cfg, plan_for(cfg, schema))
    names = part_names(scan.digests, part_context(scan.carried_types, layout.id_column, layout))
    lease = Lease(cfg.output.dir, cfg.output.storage_options, run_id=invocation.run_id, clock=clock)
    lease.acquire()
    try:
        invocation.attach_output()
        manifest = job.check(cfg, force_new=force_new, command=commands[0])
        job.write_manifest({**manifest, "rows_total": scan.rows, "shards": names})
        removed = job.prune(names, layout.id_column)
        rows_removed = source.count_missing(removed) if removed else 0
        done = job.done(names, retry_failed=retry_failed)
        todo = [(i, n) for i, n in enumerate(names) if n not in done]
        reused = (sum(d[0] for d in done.values()), sum(d[1] for d in done.values()),
                  sum(d[2] for d in done.values()))
        previous = _previous_summary(cfg)
        spent_before = read_spent(cfg.output.dir, cfg.output.storage_options)
        spent_before = previous.get("cost_usd", 0.0) if spent_before is None else spent_before
        gathered = _dispatch(ray, cfg, invocation, lease, job, source, scan, todo, reused[0] + reused[1], spent_before,
                             retry_failed=retry_failed, schema=schema, quiet=quiet)
        summary = _write_summary(cfg, ray, scan.rows, previous, gathered, reused, rows_removed, started, commands)
        summary = dataclasses.replace(summary, **invocation.stamp())
        storage.write_bytes(storage.join(cfg.output.dir, "summary.json"), summary.to_json(),
                            cfg.output.storage_options, root=cfg.output.dir)
        lease.check()
        return summary
    finally:
        lease.release()


def _dispatch(ray: Any, cfg: Config, invocation: RayInvocation, lease: Lease, job: RayJob, source: Source,
              scan: InputScan, todo: list[tuple[int, str]], resumed: int, spent_before: float, *,
              retry_failed: bool, schema: dict[str, Any] | None, quiet: bool) -> Gathered:
    """Run the shards still to do on the actors; whatever happens, keep the row map and the budget."""
    connect(ray, cfg)
    base_url, sim = _endpoint(cfg)
    limiter = start_limiter(ray, cfg, spent_before)
    lease.keep(lambda message: limiter.halt.remote(message))
    progress = Progress(scan.rows, resumed, enabled=cfg.run.progress and not quiet,
                        interval_s=cfg.run.progress_interval_s)
    gathered = Gathered()
    beat = _Heartbeat(cfg, invocation, limiter, gathered, scan.rows, resumed, len(todo), spent_before)
    invocation.watch(beat.figures)
    row_map = job.row_map()
    try:
        beat.start()
        shards = _execute(ray, cfg, source, scan, todo, base_url, limiter, [ray.put(row_map)], retry_failed, schema)
        for out in shards:
            _add(gathered, out, invocation)
            progress.advance(int(out["ok"]) + int(out["failed"]), gathered.stats, gathered.rows["failed"])
    finally:
        beat.stop()
        progress.close()
        try:
            if cfg.budget.max_cost_usd is not None:
                state = ray.get(limiter.budget_state.remote(), timeout=30)
                write_spent(cfg.output.dir, cfg.output.storage_options, state["spent"], exact=True)
            job.save_row_map(row_map.repoint(gathered.finished))
        finally:
            ray.kill(limiter)
            if sim is not None:
                sim.stop()
    return gathered


def _endpoint(cfg: Config) -> tuple[str, Any]:
    """endpoint.base_url, or the built-in simulator started in a thread (and the handle to stop it)."""
    if cfg.endpoint.base_url != "simulator":
        return cfg.endpoint.base_url, None
    # On 127.0.0.1: reachable from a local Ray instance only.
    from pipeline_simulator import SimConfig
    from pipeline_simulator.thread import SimulatorThread
    sim = SimulatorThread(SimConfig(**cfg.endpoint.simulator_options()))
    return sim.start(), sim


def _add(g: Gathered, out: dict[str, Any], invocation: RayInvocation) -> None:
    """One finished shard's report: rows, stats, its log lines and (if published) its rows' id hashes."""
    for k in g.rows:
        g.rows[k] += int(out.get(k, 0) or 0)
    _add_stats(g.stats, out)
    if out.get("stop") and not g.stop:
        g.stop, g.message = str(out["stop"]), str(out.get("message") or "")
    if out.get("log"):
        invocation.worker_lines(str(out["log"]))
    if out.get("published"):
        g.finished[str(out["name"])] = np.frombuffer(out["ids"], dtype=np.uint64)
        g.shards_done += 1


def _write_summary(cfg: Config, ray: Any, total: int, previous: dict[str, Any], g: Gathered,
                   reused: tuple[int, int, int], rows_removed: int, started: float, commands: tuple[str, str]) -> Summary:
    """summary.json from the published parts and the workers' figures, with the local driver's verdict."""
    succeeded, _ = count_rows(cfg.output.dir, cfg.output.storage_options, RESULTS)
    failed, classes = count_rows(cfg.output.dir, cfg.output.storage_options, FAILURES)
    stats = g.stats
    summary = Summary(
        out_dir=cfg.output.dir, rows_total=total, succeeded=succeeded, failed=failed,
        pending=total - succeeded - failed,
        prompt_tokens=previous.get("prompt_tokens", 0) + stats.prompt_tokens,
        completion_tokens=previous.get("completion_tokens", 0) + stats.completion_tokens,
        cost_usd=round(previous.get("cost_usd", 0.0) + stats.cost_usd, 6), run_cost_usd=round(stats.cost_usd, 6),
        wall_s=round(time.monotonic() - started, 3), requests_sent=stats.requests_sent,
        retries=dict(stats.retries), failures_by_class=classes, deduplicated=stats.deduplicated,
        resumed_rows=reused[0] + reused[1] + g.rows["reused"],
        rows_reused=reused[0] + reused[1] - reused[2] + g.rows["reused"], rows_removed=rows_removed,
        rows_input_failed=reused[2] + g.rows["input_failed"], rows_edited=g.rows["edited"],
        # rows not reached (a stop) are new, as the local engine counts them
        rows_new=g.rows["new"] + max(0, total - reused[0] - reused[1] - sum(g.rows[k] for k in
                                                                              ("reused", "new", "edited", "input_failed"))),
        config_fingerprint=cfg.request_fingerprint(), versions={"ray": ray.__version__},
        prompt_cache=_prompt_cache(previous, stats),
    )
    # The local driver's verdict (exit code, next step), from what the workers reported.
    fatal = RunFatalError(g.message) if g.stop in ("fatal", "budget") else None
    finish(summary, Verdict(g.stop or None, fatal), *commands)
    return summary


def _execute(ray: Any, cfg: Config, source: Source, scan: InputScan, todo: list[tuple[int, str]], base_url: str,
             limiter: Any, row_map: Any, retry_failed: bool, schema: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline over the shards still to do; yields one report per finished shard."""
    if not todo:
        return
    ds = ray.data.from_items([{"shard": i, "name": n} for i, n in todo], override_num_blocks=len(todo))
    input_dir = str(Path(source.files[0]).parent) if source.files and not storage.is_remote(source.files[0]) else None
    ds = ds.map_batches(
        ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.run.workers), num_cpus=0,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(by_alias=True, exclude={"source"}),
                               "source": source, "base_url": base_url, "limiter": limiter,
                               "workers": cfg.run.workers, "retry_failed": retry_failed, "schema": schema,
                               "api_key": Secret(cfg.api_key()),
                               "secret_headers": Secret(cfg.endpoint.secret_header_values(cfg.source)),
                               "input_dir": input_dir, "columns": scan.columns, "row_map": row_map},
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="pandas"):
        for rec in batch.to_dict("records"):
            yield {k: (v if not (isinstance(v, float) and math.isnan(v)) else 0) for k, v in rec.items()}


class _Heartbeat:
    """Every HEARTBEAT_S while the run goes: `ray-status.json` for `pipeline status` (shards, rows,
    cost, workers alive) and, every 30 s, the metrics file."""

    def __init__(self, cfg: Config, invocation: RayInvocation, limiter: Any, g: Gathered, total: int, resumed: int,
                 todo: int, spent_before: float) -> None:
        self.cfg, self.invocation, self.limiter, self.g = cfg, invocation, limiter, g
        self.total, self.resumed, self.todo, self.spent_before = total, resumed, todo, spent_before
        self.workers_alive = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipeline-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        metrics_at = time.monotonic()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except Exception:  # status is a courtesy: never the reason a run fails
                pass
            if self.cfg.output.metrics_file and time.monotonic() - metrics_at >= 30.0:
                metrics_at = time.monotonic()
                self.invocation._write_metrics(None)

    def beat(self) -> None:
        import ray
        state = ray.get(self.limiter.state.remote(), timeout=5)
        self.workers_alive = int(state.get("alive", 0))
        g = self.g
        body = {"run_id": self.invocation.run_id, "updated_at": time.time(), "running": True,
                "workers_alive": self.workers_alive, "shards_todo": self.todo, "shards_done": g.shards_done,
                "rows_total": self.total, "rows_done": self.resumed + g.rows["ok"] + g.rows["failed"],
                "run_cost_usd": round(g.stats.cost_usd, 6), "job_cost_usd": round(self.spent_before + g.stats.cost_usd, 6),
                "requests": g.stats.requests_sent}
        storage.write_bytes(storage.join(self.cfg.output.dir, STATUS_FILE), orjson.dumps(body),
                            self.cfg.output.storage_options, root=self.cfg.output.dir)

    def figures(self) -> Figures:
        g, s = self.g, self.g.stats
        done = g.rows["ok"] + g.rows["failed"]
        return Figures(job=self.cfg.output.dir, rows={"succeeded": g.rows["ok"], "failed": g.rows["failed"],
                                                      "pending": self.total - self.resumed - done},
                       requests={}, rate_limited=int(s.retries.get("rate_limited", 0)),
                       prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                       run_cost_usd=s.cost_usd, job_cost_usd=self.spent_before + s.cost_usd,
                       last_success=None, started=self.invocation.started, running=True)


def _prompt_cache(previous: dict[str, Any], stats: Stats) -> dict[str, Any]:
    """summary.json's prompt_cache: earlier runs' (their summary) plus this run's, as the workers counted."""
    raw = previous.get("prompt_cache")
    before: dict[str, Any] = raw if isinstance(raw, dict) else {}
    cached = int(before.get("cached_tokens", 0)) + stats.cached_tokens
    prompt = int(previous.get("prompt_tokens", 0)) + stats.prompt_tokens
    return {"cached_tokens": cached,
            "cache_write_tokens": int(before.get("cache_write_tokens", 0)) + stats.cache_write_tokens,
            "hit_share": round(cached / prompt, 4) if prompt else 0.0,
            "saved_usd": round(float(before.get("saved_usd", 0.0)) + stats.cache_saved_usd, 6),
            "run_cached_tokens": stats.cached_tokens, "run_saved_usd": round(stats.cache_saved_usd, 6)}


def _add_stats(stats: Stats, out: dict[str, Any]) -> None:
    stats.requests_sent += int(out.get("requests", 0))
    stats.prompt_tokens += int(out.get("prompt_tokens", 0))
    stats.completion_tokens += int(out.get("completion_tokens", 0))
    stats.deduplicated += int(out.get("deduplicated", 0))
    stats.cost_usd += float(out.get("cost_usd", 0.0))
    stats.cached(int(out.get("cached_tokens", 0)), int(out.get("cache_write_tokens", 0)),
                 float(out.get("cache_saved_usd", 0.0)))
    for k, v in out.items():
        if k.startswith("retry_") and v:
            stats.retries[k[6:]] += int(v)


def _previous_summary(cfg: Config) -> dict[str, Any]:
    try:
        return orjson.loads(storage.read_bytes(storage.join(cfg.output.dir, "summary.json"), cfg.output.storage_options))
    except (FileNotFoundError, OSError, orjson.JSONDecodeError):
        return {}
