"""The Ray engine's driver: `run.engine: ray` runs one job as a Ray Data pipeline over shards.

Plan (engines/ray/plan.py): the driver takes the job's lease on the output location (lease.py), scans
the input once (the same reader, ids, checks, batch digests and job identity as the local engine),
names each shard (a local engine batch) after its content, prunes the parts of shards the input no
longer has, and maps the shards without a published part through `run.workers` ShardWorker actors
(`map_batches(..., compute=ActorPoolStrategy(size=workers))`, one shard per call). Limits and the
budget are shared through one limiter actor; answers go to the journal in output.dir
(state/segments.py); parts are published per shard. The driver owns no answer: killing it loses nothing
committed, and the same command resumes. Every invocation is one line in history.jsonl, with
pipeline.log (driver and workers), the metrics file and the webhook (invocation.py); summary.json, the
quality gate and output.publish are summary.py's. Cascades and the audit run inside the workers, per shard.
Layout, commit protocol and loss bound: docs/ray.md.
"""
from __future__ import annotations

import asyncio
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

from ...common.parts import part_context, part_names
from ...config import Config
from ...core.progress import Progress
from ...errors import ConfigError
from ...ops.figures import Figures
from ...prepare.structured import plan_for
from ...read import storage
from ...read.reader import InputScan, Source
from ...send.stats import Stats
from ...state.jobdir import resume_command
from ...write.output import Summary
from .budget import spent_so_far, write_spent
from .invocation import RayInvocation
from .lease import Lease
from .limiter import LimiterActor
from .plan import RayJob
from .status import STATUS_FILE
from .summary import check_publish, previous_summary, write_summary
from .worker import ShardInput, ShardWorker, Wiring, make_layout

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


@dataclass(frozen=True)
class RunArgs:
    """What this invocation was asked (run_ray's flags)."""

    retry_failed: bool = False
    force_new: bool = False
    schema: dict[str, Any] | None = None
    quiet: bool = False
    config_path: str | None = None
    overrides: list[str] | None = None
    clock: Callable[[], float] = time.time


@dataclass
class RayPass:
    """One invocation's plan, from the job check to the summary: what the shards need and what the
    summary counts (the shards reused as they were, the rows that left the input, the earlier summary)."""

    ray: Any
    cfg: Config
    invocation: RayInvocation
    args: RunArgs
    commands: tuple[str, str]
    started: float
    source: Source
    scan: InputScan
    job: RayJob
    lease: Lease
    todo: list[tuple[int, str]] = field(default_factory=list)
    reused: tuple[int, int, int] = (0, 0, 0)  # ok, failed and input-failed rows of the parts reused
    rows_removed: int = 0
    previous: dict[str, Any] = field(default_factory=dict)
    spent_before: float = 0.0

    @property
    def resumed(self) -> int:
        return self.reused[0] + self.reused[1]


def run_ray(cfg: Config, *, retry_failed: bool = False, force_new: bool = False,
            schema: dict[str, Any] | None = None, quiet: bool = False, config_path: str | None = None,
            overrides: list[str] | None = None, clock: Callable[[], float] = time.time) -> Summary:
    """One invocation; `clock` is the lease's (tests move it instead of waiting for an expiry)."""
    ray = import_ray()
    invocation = RayInvocation(cfg)
    args = RunArgs(retry_failed, force_new, schema, quiet, config_path or cfg.source, overrides, clock)
    try:
        summary = _run(ray, cfg, invocation, args)
    except BaseException as exc:
        asyncio.run(invocation.finish(None, exc))
        raise
    asyncio.run(invocation.finish(summary, None))
    return summary


def _run(ray: Any, cfg: Config, invocation: RayInvocation, args: RunArgs) -> Summary:
    started = time.monotonic()
    path = args.config_path or cfg.source
    commands = (resume_command(path, args.overrides, retry_failed=args.retry_failed, out_dir=cfg.output.dir),
                resume_command(path, args.overrides, retry_failed=True, out_dir=cfg.output.dir))
    cfg.api_key()  # a missing key is a usage error here, before anything starts
    cfg.endpoint.secret_header_values(cfg.source)  # so is a missing secret header
    check_publish(cfg)
    job = RayJob(cfg)
    job.adopt_batch_size(cfg)
    source = Source(cfg.input)
    scan = source.scan()
    layout = make_layout(cfg, plan_for(cfg, args.schema))
    names = part_names(scan.digests, part_context(scan.carried_types, layout.id_column, layout))
    lease = Lease(cfg.output.dir, cfg.output.storage_options, run_id=invocation.run_id, clock=args.clock)
    lease.acquire()
    try:
        invocation.attach_output()
        manifest = job.check(cfg, force_new=args.force_new, command=commands[0])
        job.write_manifest({**manifest, "rows_total": scan.rows, "shards": names})
        p = RayPass(ray, cfg, invocation, args, commands, started, source, scan, job, lease)
        removed = job.prune(names, layout.id_column)
        job.sweep()  # an earlier run's workers are gone with their driver
        p.rows_removed = source.count_missing(removed) if removed else 0
        done = job.done(names, retry_failed=args.retry_failed)
        p.todo = [(i, n) for i, n in enumerate(names) if n not in done]
        p.reused = (sum(d[0] for d in done.values()), sum(d[1] for d in done.values()),
                    sum(d[2] for d in done.values()))
        p.previous = previous_summary(cfg)
        p.spent_before = spent_so_far(cfg.output.dir, cfg.output.storage_options,
                                      float(p.previous.get("cost_usd", 0.0) or 0.0))
        gathered = _dispatch(p)
        summary = write_summary(p, gathered, set(names))
        lease.check()
        return summary
    finally:
        lease.release()


def _dispatch(p: RayPass) -> Gathered:
    """Run the shards still to do on the actors; whatever happens, keep the row map and the budget."""
    ray, cfg = p.ray, p.cfg
    connect(ray, cfg)
    base_url, sim = _endpoint(cfg)
    limiter = start_limiter(ray, cfg, p.spent_before)
    p.lease.keep(lambda message: limiter.halt.remote(message))
    progress = Progress(p.scan.rows, p.resumed, enabled=cfg.run.progress and not p.args.quiet,
                        interval_s=cfg.run.progress_interval_s)
    gathered = Gathered()
    beat = _Heartbeat(p, limiter, gathered)
    p.invocation.watch(beat.figures)
    row_map = p.job.row_map()
    try:
        beat.start()
        for out in _execute(p, Wiring.of(cfg, base_url, limiter, p.args.schema), [ray.put(row_map)]):
            _add(gathered, out, p.invocation)
            progress.advance(int(out["ok"]) + int(out["failed"]), gathered.stats, gathered.rows["failed"])
        p.job.sweep()  # every shard task has returned: a killed upload's leftover is nobody's now
    finally:
        beat.stop()
        progress.close()
        try:
            _keep_budget(p, ray.get(limiter.budget_state.remote(), timeout=30), gathered)
            p.job.save_row_map(row_map.repoint(gathered.finished))
        finally:
            ray.kill(limiter)
            if sim is not None:
                sim.stop()
    return gathered


def _keep_budget(p: RayPass, state: dict[str, Any], g: Gathered) -> None:
    """The job's spend and the endpoint's learned markup in `_budget.json`: the budget's exact figure, or
    without a cap (once the endpoint costed an answer) what the job has spent by the workers' count."""
    cfg = p.cfg
    if cfg.budget.max_cost_usd is not None:
        spent = state["spent"]
    elif state.get("markup_known"):
        spent = p.spent_before + g.stats.cost_usd
    else:
        return
    write_spent(cfg.output.dir, cfg.output.storage_options, spent, exact=True, learned=state.get("learned"))


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


def _execute(p: RayPass, wiring: Wiring, row_map: list[Any]) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline over the shards still to do; yields one report per finished shard."""
    if not p.todo:
        return
    ray, files = p.ray, p.source.files
    ds = ray.data.from_items([{"shard": i, "name": n} for i, n in p.todo], override_num_blocks=len(p.todo))
    input_dir = str(Path(files[0]).parent) if files and not storage.is_remote(files[0]) else None
    shards = ShardInput(p.source, p.args.retry_failed, input_dir, p.scan.columns, row_map)
    ds = ds.map_batches(ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=p.cfg.run.workers),
                        num_cpus=0, fn_constructor_kwargs={"wiring": wiring, "shards": shards})
    for batch in ds.iter_batches(batch_size=1, batch_format="pandas"):
        for rec in batch.to_dict("records"):
            yield {k: (v if not (isinstance(v, float) and math.isnan(v)) else 0) for k, v in rec.items()}


class _Heartbeat:
    """Every HEARTBEAT_S while the run goes: `ray-status.json` for `pipeline status` (shards, rows,
    cost, workers alive) and, every 30 s, the metrics file."""

    def __init__(self, p: RayPass, limiter: Any, g: Gathered) -> None:
        self.cfg, self.invocation, self.limiter, self.g = p.cfg, p.invocation, limiter, g
        self.total, self.resumed, self.todo, self.spent_before = p.scan.rows, p.resumed, len(p.todo), p.spent_before
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
