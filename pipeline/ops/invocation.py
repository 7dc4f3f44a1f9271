"""One invocation of a job, as the operator sees it afterwards.

It gives the run its id and clock, opens `pipeline.log` once the run owns the output folder (a run
refused by the lock must not write into another run's log), and when the run ends, however it ends,
appends the run record to `history.jsonl`, logs run_end, writes the metrics file and sends the alert.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import EXIT_INTERRUPTED, EXIT_STOPPED, InputChangedError, PipelineError, UsageError
from . import history
from .logfile import LogFile, iso_utc

log = logging.getLogger("pipeline")

EXIT_INTERNAL = 70  # errors.py's EXIT_INTERNAL (documented there); a bug, never a row-level outcome


def new_run_id(now: float) -> str:
    """Sortable by time, unique without coordination: 20261201T153000Z-1a2b3c."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def exit_code_of(exc: BaseException) -> int:
    """The exit code the CLI gives this exception (cli.main)."""
    if isinstance(exc, PipelineError):
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return EXIT_INTERRUPTED
    if isinstance(exc, (OSError, sqlite3.Error)):
        return EXIT_STOPPED
    return EXIT_INTERNAL


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

    @property
    def started_at(self) -> str:
        return iso_utc(self.started)

    def attach(self, out_dir: Path) -> None:
        """The run owns out_dir now: open its log and say the run started."""
        self.logfile = LogFile(out_dir)
        log.info("run %s started (pid %d)", self.run_id, os.getpid(),
                 extra={"event": "run_start", "run_id": self.run_id, "pid": os.getpid(), "config": self.cfg.source})

    def stamp(self) -> dict[str, str]:
        """The summary's run_id, started_at and finished_at (now)."""
        return {"run_id": self.run_id, "started_at": self.started_at, "finished_at": iso_utc(time.time())}

    def record(self, summary: Any, exc: BaseException | None) -> history.RunRecord:
        if summary is not None:
            return history.RunRecord(
                run_id=self.run_id, started_at=self.started_at, finished_at=summary.finished_at or iso_utc(time.time()),
                exit_code=summary.exit_code, rows_total=summary.rows_total, rows_new=summary.rows_new,
                rows_reused=summary.rows_reused, rows_removed=summary.rows_removed, succeeded=summary.succeeded,
                failed=summary.failed, pending=summary.pending, requests=summary.requests_sent,
                retries=dict(summary.retries), cost_usd=summary.run_cost_usd, stop_reason=summary.stopped,
                message=summary.stop_message)
        assert exc is not None
        return history.RunRecord(run_id=self.run_id, started_at=self.started_at, finished_at=iso_utc(time.time()),
                                 exit_code=exit_code_of(exc), stop_reason=stop_reason_of(exc),
                                 message=str(exc) or type(exc).__name__)

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
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None
        return record
