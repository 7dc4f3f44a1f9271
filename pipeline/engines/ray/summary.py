"""How a Ray run ends: summary.json from the published parts and the workers' figures, the local engine's
verdict (exit code, next step), the labels' quality and its gate, and `output.publish`.

The quality figures are the local engine's (write/quality.py `figures_of`, `apply_gate`), read from the
parts' confidence, cascade_stage and audit_agrees columns instead of the merged results file: a failed
gate ends the run with exit 4, summary.json written, nothing published, and the run record (history,
webhook) carries the gate's message.

`output.publish` copies the parts folders (`results.parquet/`, `failures.parquet/`) and then summary.json
to the folder named, each object complete or absent, and removes parts there that this input no longer
has, so the published folder reads as the job's outputs; a failed upload stops the run resumably (exit 3),
as on the local engine.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from ...config import Config
from ...core.finish import Verdict, finish
from ...errors import EXIT_QUALITY_GATE, EXIT_STOPPED, ConfigError, RunFatalError
from ...read import storage
from ...send.stats import Stats
from ...write.output import Summary
from ...write.quality import QUALITY_COLUMNS, apply_gate, figures_of, quality_on
from .plan import FAILURES, RESULTS, shard_of
from .status import count_rows, part_uris, read_parts

if TYPE_CHECKING:
    from .driver import Gathered, RayPass

log = logging.getLogger("pipeline")


def check_publish(cfg: Config) -> None:
    """output.publish names an object-store folder (as on the local engine), said before anything is paid."""
    if cfg.output.publish and not storage.is_remote(cfg.output.publish):
        raise ConfigError("must be an s3:// or gs:// folder", key="output.publish", file=cfg.source)


def previous_summary(cfg: Config) -> dict[str, Any]:
    try:
        return orjson.loads(storage.read_bytes(storage.join(cfg.output.dir, "summary.json"),
                                               cfg.output.storage_options))
    except (FileNotFoundError, OSError, orjson.JSONDecodeError):
        return {}


def write_summary(p: RayPass, g: Gathered, names: set[str]) -> Summary:
    """summary.json with the local driver's verdict, the quality gate applied and the outputs published."""
    cfg = p.cfg
    summary = dataclasses.replace(_summary(p, g), **p.invocation.stamp())
    # The local driver's verdict (exit code, next step), from what the workers reported.
    fatal = RunFatalError(g.message) if g.stop in ("fatal", "budget") else None
    finish(summary, Verdict(g.stop or None, fatal), *p.commands)
    if quality_on(cfg):
        opts = cfg.output.storage_options
        summary.quality = figures_of(read_parts(cfg.output.dir, opts, RESULTS, names, QUALITY_COLUMNS), cfg)
        apply_gate(summary, cfg)
    published = _publish(cfg, summary, names)
    storage.write_bytes(storage.join(cfg.output.dir, "summary.json"), summary.to_json(),
                        cfg.output.storage_options, root=cfg.output.dir)
    if published and cfg.output.publish:
        try:
            storage.write_bytes(storage.join(cfg.output.publish, "summary.json"), summary.to_json(),
                                cfg.output.storage_options)
        except OSError as exc:
            log.error("could not publish summary.json to %s: %s", cfg.output.publish, exc)
    return summary


def _summary(p: RayPass, g: Gathered) -> Summary:
    """The counts from the published parts (footers) and the workers' figures, over earlier runs'."""
    cfg, total, reused, previous, stats = p.cfg, p.scan.rows, p.reused, p.previous, g.stats
    succeeded, _ = count_rows(cfg.output.dir, cfg.output.storage_options, RESULTS)
    failed, classes = count_rows(cfg.output.dir, cfg.output.storage_options, FAILURES)
    reached = sum(g.rows[k] for k in ("reused", "new", "edited", "input_failed"))
    return Summary(
        out_dir=cfg.output.dir, rows_total=total, succeeded=succeeded, failed=failed,
        pending=total - succeeded - failed,
        prompt_tokens=previous.get("prompt_tokens", 0) + stats.prompt_tokens,
        completion_tokens=previous.get("completion_tokens", 0) + stats.completion_tokens,
        cost_usd=round(previous.get("cost_usd", 0.0) + stats.cost_usd, 6), run_cost_usd=round(stats.cost_usd, 6),
        wall_s=round(time.monotonic() - p.started, 3), requests_sent=stats.requests_sent,
        retries=dict(stats.retries), failures_by_class=classes, deduplicated=stats.deduplicated,
        resumed_rows=p.resumed + g.rows["reused"], rows_reused=p.resumed - reused[2] + g.rows["reused"],
        rows_removed=p.rows_removed, rows_input_failed=reused[2] + g.rows["input_failed"],
        rows_edited=g.rows["edited"],
        # rows not reached (a stop) are new, as the local engine counts them
        rows_new=g.rows["new"] + max(0, total - p.resumed - reached),
        config_fingerprint=cfg.request_fingerprint(), versions={"ray": p.ray.__version__},
        prompt_cache=_prompt_cache(previous, stats),
    )


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


def _publish(cfg: Config, summary: Summary, names: set[str]) -> bool:
    """The parts to output.publish (summary.json follows once they are all there); a failed gate publishes
    nothing, a failed upload stops the run resumably. True when the parts are published."""
    dest = cfg.output.publish
    if not dest:
        return False
    if summary.exit_code == EXIT_QUALITY_GATE:
        log.error("quality gate failed: not publishing to %s", dest)
        summary.quality["published"] = False
        return False
    try:
        _copy_parts(cfg, dest, names)
    except (OSError, ConfigError) as exc:
        log.error("could not publish to %s: %s", dest, exc)
        summary.stopped, summary.exit_code = "publish", EXIT_STOPPED
        summary.stop_message = f"publishing to {dest} failed: {exc}"
        summary.next_step = "the outputs in output.dir are complete; re-run the same command to publish again"
        return False
    return True


def _copy_parts(cfg: Config, dest: str, names: set[str]) -> None:
    opts, root = cfg.output.storage_options, cfg.output.dir
    for folder in (FAILURES, RESULTS):  # failures first: a reader that sees a results part sees its failures
        for uri in part_uris(root, opts, folder, names):
            name = uri.rsplit("/", 1)[-1]
            storage.write_bytes(storage.join(dest, folder, name), storage.read_bytes(uri, opts), opts)
        gone = [u for u in storage.list_files(storage.join(dest, folder), opts) if shard_of(u) not in (None, *names)]
        for uri in gone:  # parts of rows that left the input: gone from the published outputs too
            fs, path = storage.filesystem(uri, opts)
            fs.delete_file(path)
