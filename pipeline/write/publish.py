"""`output.publish`: the local engine's finished outputs copied to an object-store folder.

Each file is uploaded complete or not at all (read/storage.py), results and failures before
summary.json, so a reader who sees the new summary sees the files it describes. A failed upload
leaves the local outputs as they are and stops the run resumably (exit 3): the same command
publishes again.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..errors import EXIT_QUALITY_GATE, EXIT_STOPPED, ConfigError
from ..read import storage
from .output import Summary, write_json_atomic

log = logging.getLogger("pipeline")


def check_local_output(cfg: Config) -> None:
    """The local engine writes a job folder on this machine; object storage is for output.publish."""
    if storage.is_remote(cfg.output.dir):
        raise ConfigError("the local engine needs a local folder; set output.publish to copy the results "
                          "to object storage (or use run.engine: ray)", key="output.dir", file=cfg.source)
    if cfg.output.publish and not storage.is_remote(cfg.output.publish):
        raise ConfigError("must be an s3:// or gs:// folder", key="output.publish", file=cfg.source)


def publish_outputs(cfg: Config, job: Path, summary: Summary) -> None:
    """Write summary.json locally and, with output.publish, upload the outputs; failures stop resumably. A
    failed quality gate (exit 4) publishes nothing: the outputs stay local for review."""
    dest = cfg.output.publish
    if dest and summary.exit_code == EXIT_QUALITY_GATE:
        log.error("quality gate failed: not publishing to %s", dest)
        summary.quality["published"] = False
        dest = None
    if dest:
        try:
            storage.publish([str(job / "results.parquet"), str(job / "failures.parquet")], dest,
                            cfg.output.storage_options)
        except (OSError, ConfigError) as exc:
            log.error("could not publish to %s: %s", dest, exc)
            summary.stopped, summary.exit_code = "publish", EXIT_STOPPED
            summary.stop_message = f"publishing to {dest} failed: {exc}"
            summary.next_step = "the local outputs are complete; re-run the same command to publish again"
            dest = None
    write_json_atomic(job / "summary.json", summary.to_json())
    if dest:
        try:
            storage.publish([str(job / "summary.json")], dest, cfg.output.storage_options)
        except OSError as exc:
            log.error("could not publish summary.json to %s: %s", dest, exc)
