"""One invocation of a job, as the operator sees it afterwards.

It gives the run its id and clock, opens `pipeline.log` once the run owns the output folder (a run
refused by the lock must not write into another run's log), keeps the heartbeat (progress once a
second, the metrics file every 30 s), and when the run ends, however it ends, appends the run record
to `history.jsonl`, logs run_end, writes the metrics file a last time and sends the alert.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common import diagnosis
from ..config import Config
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    InputChangedError,
    PipelineError,
    UsageError,
)
from . import history, notify
from .figures import Figures, Tally, agreement_of
from .logfile import LogFile, iso_utc

log = logging.getLogger("pipeline")

HEARTBEAT_S = 1.0   # how often the progress display is refreshed (and the metrics file checked for due)
METRICS_INTERVAL_S = 30.0


def new_run_id(now: float) -> str:
    """Sortable by time, unique without coordination: 20261201T153000Z-1a2b3c."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def exit_code_of(exc: BaseException, out_dir: str | None = None) -> int:
    """The exit code the CLI gives this exception (cli.main): the same mapping, diagnosis.explain for the
    environment's failures, so the history, metrics and webhook never say "3" where the process says 70."""
    if isinstance(exc, PipelineError):  # InternalError included: 70
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return EXIT_INTERRUPTED
    known = diagnosis.explain(exc, out_dir)
    return known[1] if known is not None else EXIT_INTERNAL


def stop_reason_of(exc: BaseException) -> str:
    if isinstance(exc, UsageError):
        return "refused"
    if isinstance(exc, InputChangedError):
        return "input_changed"
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted"
    return "error"


class Invocation:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.output.dir)
        self.started = time.time()
        self.run_id = new_run_id(self.started)
        self.logfile: LogFile | None = None
        self.owner = False  # the run got the folder's lock (a refused second run must not touch its files)
        self.tally = Tally()
        self._figures: Callable[[], Figures] | None = None

    @property
    def job_name(self) -> str:
        """How people and dashboards name the job: job.name, else its folder."""
        return self.cfg.job.name or str(self.out_dir)

    def watch(self, figures: Callable[[], Figures]) -> None:
        """How to read the job's figures while it runs (the runner knows; we only write them)."""
        self._figures = figures

    async def heartbeat(self, progress: Any) -> None:
        """Until cancelled: the progress display once a second, the metrics file every 30 s."""
        written = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            progress.tick()
            if self.cfg.output.metrics_file and time.monotonic() - written >= METRICS_INTERVAL_S:
                written = time.monotonic()
                self._write_metrics(None)

    @property
    def started_at(self) -> str:
        return iso_utc(self.started)

    def attach(self, out_dir: Path) -> None:
        """The run owns out_dir now: open its log and say the run started."""
        self.owner = True
        try:
            self.logfile = LogFile(out_dir)
        except OSError as err:  # e.g. a link planted at pipeline.log: never followed, the run goes on
            log.warning("cannot write %s: %s", out_dir / "pipeline.log", err)
        log.info("run %s started (pid %d)", self.run_id, os.getpid(),
                 extra={"event": "run_start", "run_id": self.run_id, "pid": os.getpid(), "config": self.cfg.source})

    def stamp(self) -> dict[str, Any]:
        """The summary's run_id, started_at and finished_at (now)."""
        return {"run_id": self.run_id, "started_at": self.started_at, "finished_at": iso_utc(time.time())}

    def record(self, summary: Any, exc: BaseException | None) -> history.RunRecord:
        if summary is not None:
            return history.RunRecord(
                run_id=self.run_id, started_at=self.started_at, finished_at=summary.finished_at or iso_utc(time.time()),
                exit_code=summary.exit_code, rows_total=summary.rows_total, rows_new=summary.rows_new,
                rows_edited=summary.rows_edited, rows_retried=summary.rows_retried, rows_reused=summary.rows_reused,
                rows_input_failed=summary.rows_input_failed, rows_removed=summary.rows_removed,
                succeeded=summary.succeeded,
                failed=summary.failed, pending=summary.pending, requests=summary.requests_sent,
                retries=dict(summary.retries), cost_usd=summary.run_cost_usd,
                cached_tokens=int(summary.prompt_cache.get("run_cached_tokens", 0)),
                cache_saved_usd=float(summary.prompt_cache.get("run_saved_usd", 0.0)), stop_reason=summary.stopped,
                message=summary.stop_message, quality=getattr(summary, "quality", None) or None)
        assert exc is not None
        record = history.RunRecord(run_id=self.run_id, started_at=self.started_at, finished_at=iso_utc(time.time()),
                                   exit_code=exit_code_of(exc, str(self.out_dir)), stop_reason=stop_reason_of(exc),
                                   message=str(exc) or type(exc).__name__)
        # No summary (a changed input, a crash), yet requests may have been paid for: the live figures say
        # what this run really sent and spent.
        f = self._live_figures()
        if f is not None:
            record.requests, record.cost_usd = sum(f.requests.values()), round(f.run_cost_usd, 6)
            record.succeeded, record.failed = f.rows.get("succeeded", 0), f.rows.get("failed", 0)
            record.pending = f.rows.get("pending", 0)
        return record

    def _live_figures(self) -> Figures | None:
        """The runner's figures now, or None before it had any (or when reading them fails: a record
        without them is better than none)."""
        if self._figures is None:
            return None
        try:
            return self._figures()
        except Exception as err:  # noqa: BLE001 - the run is ending anyway; never hide how it ended
            log.warning("could not read the run's figures for its record: %s", err)
            return None

    async def finish(self, summary: Any, exc: BaseException | None) -> history.RunRecord:
        """Record how the run ended; never raises (an unwritable folder must not hide the run's outcome)."""
        record = self.record(summary, exc)
        if exc is not None and record.exit_code == EXIT_INTERNAL:
            trace = "".join(traceback.format_exception(exc))
            log.error("internal error: %s", exc, extra={"event": "internal_error", "traceback": trace})
        log.info("run %s ended: exit %d%s", self.run_id, record.exit_code,
                 f" ({record.stop_reason})" if record.stop_reason else "",
                 extra={"event": "run_end", "run_id": self.run_id, "exit_code": record.exit_code,
                        "stop_reason": record.stop_reason})
        try:
            if self.out_dir.is_dir():
                history.append(self.out_dir, record)
        except OSError as err:
            log.warning("could not append to %s: %s", self.out_dir / history.HISTORY_FILE, err)
        if self.cfg.output.metrics_file and self.owner:  # not over the figures of the run holding the lock
            self._write_metrics(record)
        await self._notify(record)
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None
        return record

    def _write_metrics(self, record: history.RunRecord | None) -> None:
        """The live figures, or at the end the record's (with its exit code)."""
        path = self.cfg.output.metrics_file
        assert path is not None
        f = self._live_figures() or Figures(
            job=self.job_name, rows={}, requests={}, rate_limited=0, prompt_tokens=0, completion_tokens=0,
            run_cost_usd=0.0, job_cost_usd=0.0, last_success=None, started=self.started, running=True)
        if record is not None:
            f.running, f.exit_code = False, record.exit_code
            if record.rows_total:
                f.rows = {"succeeded": record.succeeded, "failed": record.failed, "pending": record.pending}
            f.run_cost_usd = record.cost_usd
            f.cached_tokens, f.cache_saved_usd = record.cached_tokens, record.cache_saved_usd
            f.agreement = agreement_of(record.quality)
        from .metrics import (
            write_metrics,  # prometheus_client only for jobs that write metrics
        )

        try:
            write_metrics(path, f)
        except OSError as err:
            log.warning("could not write the metrics file %s: %s", path, err)

    async def _notify(self, record: history.RunRecord) -> None:
        n = self.cfg.notify
        outcome = "success" if record.exit_code == 0 else "failure"
        if n.webhook and outcome in n.on:
            payload = {"job": self.job_name, "out_dir": str(self.out_dir), "outcome": outcome,
                       "host": socket.gethostname(), **record.to_json()}
            await notify.post(n.webhook, notify.shape(payload, n.format), timeout_s=n.timeout_s, retries=n.retries)
