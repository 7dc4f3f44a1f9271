"""How a local run ends: rows counted as new or reused, the exit code and next step, the job's figures
for the metrics file while it runs, and the versions stamped into summary.json (engines/runner.py)."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

from ..errors import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, Fatal
from ..ops.figures import Figures
from ..ops.invocation import Invocation
from ..state.jobdir import JobDir
from ..state.store import PartCounts
from ..vocab import Record
from ..write.output import Summary
from .progress import Progress
from .transformer import Core, OutcomeBatch


class RowCount:
    """Rows new and reused: a row is new when its request had no answer before this run (answered now,
    or still pending), reused when an earlier run answered it (or the shared cache did, at no cost)."""

    def __init__(self, started: float, reused: PartCounts) -> None:
        self.started = started
        self.new, self.reused = 0, reused.ok + reused.request_failed

    def add(self, out: OutcomeBatch) -> None:
        for key, o in zip(out.keys, out.outcomes):
            if key is None:
                continue  # a bad input row has no request: neither
            if o is None or (isinstance(o, Record) and not o.cache_hit and o.created_at >= self.started):
                self.new += 1
            else:
                self.reused += 1


def figures(jobdir: JobDir, rows: int, progress: Progress, reused: PartCounts, core: Core, invocation: Invocation,
             spent_before: float) -> Figures:
    """The job's figures now, for the metrics file: the rows resolved so far are the progress bar's."""
    s, t = core.stats, invocation.tally
    failed = progress.failed + reused.failed
    return Figures(job=str(jobdir.path), rows={"succeeded": progress.done - failed, "failed": failed,
                                               "pending": rows - progress.done},
                   requests=dict(t.by_class), rate_limited=t.rate_limited, prompt_tokens=s.prompt_tokens,
                   completion_tokens=s.completion_tokens, run_cost_usd=s.cost_usd,
                   job_cost_usd=spent_before + s.cost_usd, last_success=t.last_success,
                   started=invocation.started, running=True)


class HowItStopped(Protocol):
    """What finish() reads of a run's dispatch: Core has it; a driver that ran elsewhere builds a Verdict."""

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def fatal(self) -> Fatal | None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """How dispatch stopped when it ran in other processes (Ray workers): the reason and the fatal error."""

    stop_reason: str | None = None
    fatal: Fatal | None = None


def finish(summary: Summary, core: HowItStopped, resume: str, retry: str) -> None:
    """The exit code and the next step of a run, from how the core stopped and what is left."""
    reason = core.stop_reason
    if reason in ("fatal", "budget") and core.fatal is not None:
        summary.stopped, summary.exit_code = reason, EXIT_STOPPED
        summary.stop_message = str(core.fatal)
        summary.next_step = f"{core.fatal.hint}: {resume}"
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


def versions() -> dict[str, str]:
    """Python's and the main libraries' versions, stamped into summary.json."""
    out = {"python": platform.python_version()}
    for dist in ("llm-batch-pipeline", "aiohttp", "polars", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
