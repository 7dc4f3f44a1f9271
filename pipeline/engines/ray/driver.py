"""The Ray engine's driver: `run.engine: ray` runs one job as a Ray Data pipeline over shards.

Plan: the driver scans the input once (the same reader, ids and checks as the local engine), cuts it
into shards of `input.batch_size` rows (the local engine's batches), skips the shards whose results
part is already published, and maps the rest through `run.workers` ShardWorker actors
(`map_batches(..., compute=ActorPoolStrategy(size=workers))`, one shard per call). Limits are shared through one limiter
actor; answers go to the journal in output.dir (state/segments.py); parts are published per shard.
The driver owns no answer: killing it loses nothing committed, and the same command resumes.
Layout, commit protocol and loss bound: docs/ray.md.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from ...config import Config
from ...core.finish import Verdict, finish
from ...core.progress import Progress
from ...errors import ConfigError, JobChangedError, RunFatalError
from ...read import storage
from ...read.reader import InputScan, Source
from ...send.dispatch import Stats
from ...state.jobdir import resume_command
from .limiter import LimiterActor
from .worker import FAILURES, RESULTS, Secret, ShardWorker

MANIFEST = "ray-manifest.json"
NAMESPACE = "pipeline"


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


def check_manifest(cfg: Config, scan: InputScan, *, force_new: bool) -> None:
    """One job per output location: a different request config would mix answers to other requests, and
    shards are named by position, so a different input (even of the same size) is another job here too: a
    shard's part of the old input must never count as done for the new one."""
    uri = storage.join(cfg.output.dir, MANIFEST)
    content = hashlib.blake2b(b"".join(scan.digests), digest_size=16).hexdigest()
    mine = {"request_fingerprint": cfg.request_fingerprint(), "batch_size": cfg.input.batch_size,
            "rows": scan.rows, "input": content}
    try:
        theirs = orjson.loads(storage.read_bytes(uri, cfg.output.storage_options))
    except (FileNotFoundError, OSError):
        theirs = None
    if theirs is not None and theirs != mine and not force_new:
        raise JobChangedError(f"{cfg.output.dir} holds another job (different requests, input or batch size; "
                              "the Ray engine is not incremental); use another output.dir, or --force-new to "
                              "start this one over there")
    if theirs != mine:
        for folder in (RESULTS, FAILURES):  # parts of another job must not count as done
            for part in storage.list_files(storage.join(cfg.output.dir, folder), cfg.output.storage_options):
                _delete(part, cfg)
        storage.write_bytes(uri, orjson.dumps(mine), cfg.output.storage_options)


def _delete(uri: str, cfg: Config) -> None:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, cfg.output.storage_options)
        fs.delete_file(path)
    else:
        Path(uri).unlink(missing_ok=True)


def done_shards(cfg: Config) -> dict[int, str]:
    out = {}
    for uri in storage.list_files(storage.join(cfg.output.dir, RESULTS), cfg.output.storage_options):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            out[int(name[5:-8])] = uri
    return out


def count_rows(cfg: Config, folder: str) -> tuple[int, dict[str, int]]:
    """Rows in a parts folder (footers only) and, for failures, rows per error class."""
    total, classes = 0, dict[str, int]()
    for uri in storage.list_files(storage.join(cfg.output.dir, folder), cfg.output.storage_options):
        if not uri.endswith(".parquet"):
            continue
        fs, path = storage.filesystem(uri, cfg.output.storage_options) if storage.is_remote(uri) else (None, uri)
        table = pq.read_table(path, filesystem=fs, columns=["error_class"] if folder == FAILURES else [])
        total += table.num_rows
        if folder == FAILURES:
            for value in table["error_class"].to_pylist():
                classes[value] = classes.get(value, 0) + 1
    return total, classes


def run_ray(cfg: Config, *, retry_failed: bool = False, force_new: bool = False,
            schema: dict[str, Any] | None = None, quiet: bool = False, config_path: str | None = None,
            overrides: list[str] | None = None) -> Any:
    ray = import_ray()
    started = time.monotonic()
    commands = (resume_command(config_path or cfg.source, overrides, retry_failed=retry_failed),
                resume_command(config_path or cfg.source, overrides, retry_failed=True))
    cfg.api_key()  # a missing key is a usage error here, before anything starts
    cfg.endpoint.secret_header_values(cfg.source)  # so is a missing secret header
    source = Source(cfg.input)
    scan = source.scan()
    check_manifest(cfg, scan, force_new=force_new)
    previous = _previous_summary(cfg)
    todo, resumed = _shards_to_do(cfg, source, scan.rows)
    connect(ray, cfg)
    base_url, sim = _endpoint(cfg)
    limiter = ray.remote(LimiterActor).options(
        name=limiter_name(cfg), namespace=NAMESPACE, num_cpus=0, max_concurrency=10_000, max_restarts=-1,
        get_if_exists=True).remote(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute, cfg.limits.burst_s,
                                      cfg.limits.input_tokens_per_minute, cfg.limits.output_tokens_per_minute)
    progress = Progress(scan.rows, resumed, enabled=cfg.run.progress and not quiet)
    try:
        shards = _execute(ray, cfg, source, scan, todo, base_url, limiter, retry_failed, schema,
                          budget_share(cfg, previous.get("cost_usd", 0.0)))
        stats, rows, stop, message = _gather(shards, progress)
    finally:
        progress.close()
        ray.kill(limiter)
        if sim is not None:
            sim.stop()
    return _write_summary(cfg, ray, scan.rows, previous, stats, resumed + rows["reused"], started, stop, message,
                          commands)


def _shards_to_do(cfg: Config, source: Source, rows: int) -> tuple[list[int], int]:
    """The shards whose results part is not published yet, and the rows of those that are."""
    size = source.cfg.rows_per_batch
    done = done_shards(cfg)
    n_shards = math.ceil(rows / size)
    todo = [i for i in range(n_shards) if i not in done]
    return todo, sum(min(size, rows - i * size) for i in done if i < n_shards)


def _endpoint(cfg: Config) -> tuple[str, Any]:
    """endpoint.base_url, or the built-in simulator started in a thread (and the handle to stop it)."""
    if cfg.endpoint.base_url != "simulator":
        return cfg.endpoint.base_url, None
    # On 127.0.0.1: reachable from a local Ray instance only.
    from pipeline_simulator import SimConfig
    from pipeline_simulator.thread import SimulatorThread
    sim = SimulatorThread(SimConfig(**cfg.endpoint.simulator_options()))
    return sim.start(), sim


def _gather(shards: Any, progress: Progress) -> tuple[Stats, dict[str, int], str, str]:
    """Sum the workers' per-shard rows; keep the first stop reported."""
    stats, rows = Stats(), {"ok": 0, "failed": 0, "pending": 0, "reused": 0}
    stop, message = "", ""
    for out in shards:
        for k in rows:
            rows[k] += out[k]
        _add_stats(stats, out)
        stop, message = (out["stop"], out["message"]) if out["stop"] and not stop else (stop, message)
        progress.advance(out["ok"] + out["failed"], stats, rows["failed"])
    return stats, rows, stop, message


def _write_summary(cfg: Config, ray: Any, total: int, previous: dict[str, Any], stats: Stats, resumed: int,
                   started: float, stop: str, message: str, commands: tuple[str, str]) -> Any:
    """summary.json from the published parts and the workers' figures, with the local driver's verdict."""
    from ...write.output import Summary
    succeeded, _ = count_rows(cfg, RESULTS)
    failed, classes = count_rows(cfg, FAILURES)
    summary = Summary(
        out_dir=cfg.output.dir, rows_total=total, succeeded=succeeded, failed=failed,
        pending=total - succeeded - failed,
        prompt_tokens=previous.get("prompt_tokens", 0) + stats.prompt_tokens,
        completion_tokens=previous.get("completion_tokens", 0) + stats.completion_tokens,
        cost_usd=round(previous.get("cost_usd", 0.0) + stats.cost_usd, 6), run_cost_usd=round(stats.cost_usd, 6),
        wall_s=round(time.monotonic() - started, 3), requests_sent=stats.requests_sent,
        retries=dict(stats.retries), failures_by_class=classes, deduplicated=stats.deduplicated,
        resumed_rows=resumed, config_fingerprint=cfg.request_fingerprint(),
        versions={"ray": ray.__version__}, prompt_cache=_prompt_cache(previous, stats),
    )
    # The local driver's verdict (exit code, next step), from what the workers reported.
    fatal = RunFatalError(message) if stop in ("fatal", "budget") else None
    finish(summary, Verdict(stop or None, fatal), *commands)
    storage.write_bytes(storage.join(cfg.output.dir, "summary.json"), summary.to_json(), cfg.output.storage_options)
    return summary


def budget_share(cfg: Config, spent_before: float) -> float | None:
    """Each worker's part of what is left of budget.max_cost_usd after earlier runs: the workers' caps add
    up to the job's, so the job stays within it (a worker Ray restarts starts a fresh share: a job whose
    workers die can overshoot by one share per restart)."""
    cap = cfg.budget.max_cost_usd
    return None if cap is None else max(0.0, cap - spent_before) / cfg.run.workers


def _execute(ray: Any, cfg: Config, source: Source, scan: Any, todo: list[int], base_url: str, limiter: Any,
             retry_failed: bool, schema: dict[str, Any] | None, budget: float | None) -> Any:
    """The Ray Data pipeline over the shards still to do; yields one stats row per finished shard."""
    if not todo:
        return
    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    input_dir = str(Path(source.files[0]).parent) if source.files and not storage.is_remote(source.files[0]) else None
    ds = ds.map_batches(
        ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.run.workers), num_cpus=0,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(by_alias=True, exclude={"source"}),
                               "source": source, "base_url": base_url, "limiter": limiter,
                               "workers": cfg.run.workers, "retry_failed": retry_failed, "schema": schema,
                               "api_key": Secret(cfg.api_key()),
                               "secret_headers": Secret(cfg.endpoint.secret_header_values(cfg.source)),
                               "input_dir": input_dir, "columns": scan.columns, "budget": budget},
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="pandas"):
        for rec in batch.to_dict("records"):
            yield {k: (v if not (isinstance(v, float) and math.isnan(v)) else 0) for k, v in rec.items()}


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
