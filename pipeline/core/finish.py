"""How a local run ends: rows counted as new, edited, retried, reused or input-failed, the exit code and
next step, the job's figures for the metrics file while it runs, and the versions stamped into summary.json
(engines/runner.py)."""
from __future__ import annotations

import platform
from array import array
from collections.abc import Collection
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from ..config import Config
from ..errors import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, Fatal
from ..models.prices import PromptCache, cache_saving, find_price
from ..ops.figures import Figures
from ..ops.invocation import Invocation
from ..read.scan import id_key
from ..send.stats import Stats
from ..state.jobdir import JobDir
from ..state.store import PartCounts
from ..vocab import Record
from ..write.output import Summary
from .progress import Progress
from .transformer import Core, OutcomeBatch


class RowCount:
    """Where each row of this run's input stands, counted once, so the counts add up to the input's rows:
    new (its request never had an answer), edited (a row the previous outputs held, now asking something
    new), retried (its request had a failed answer that is asked again), reused (an earlier run or the
    shared cache answered it, at no cost) and input-failed (it never became a request). Rows a stopped run
    did not reach count as new."""

    def __init__(self, started: float, reused: PartCounts, asked_again: Collection[str] = ()) -> None:
        self.started = started
        self.new, self.reused = 0, reused.ok + reused.request_failed
        self.input_failed = reused.failed - reused.request_failed  # reused parts hold their input failures too
        self.edited = self.retried = 0
        self._asked_again = asked_again  # keys the store had a failed answer for (LocalAnswers.asked_again)
        self._new_ids = array("Q")  # 8-byte keys of the new rows' ids: edited ones are told apart at the end

    def add(self, out: OutcomeBatch) -> None:
        for key, o, rid in zip(out.keys, out.outcomes, out.batch.ids):
            if key is None:
                self.input_failed += 1
            elif o is None or (isinstance(o, Record) and not o.cache_hit and o.created_at >= self.started):
                if key in self._asked_again:
                    self.retried += 1
                else:
                    self.new += 1
                    self._new_ids.append(id_key(rid, False))
            else:
                self.reused += 1

    def settle(self, rows: int, previous_ids: list[pa.ChunkedArray], derived_ids: bool) -> None:
        """At the end: new rows whose id the previous outputs held were edited (a derived id changes with
        the row, so it cannot tell); rows never reached are new."""
        if self._new_ids and not derived_ids:
            before = [id_key(s, False) for col in previous_ids for s in col.to_pylist() if s is not None]
            if before:
                found = pc.is_in(pa.array(self._new_ids, pa.uint64()), value_set=pa.array(before, pa.uint64()))
                self.edited = int(pc.sum(found).as_py() or 0)
                self.new -= self.edited
        counted = self.new + self.edited + self.retried + self.reused + self.input_failed
        self.new += max(0, rows - counted)


def figures(jobdir: JobDir, rows: int, progress: Progress, reused: PartCounts, core: Core, invocation: Invocation,
             spent_before: float) -> Figures:
    """The job's figures now, for the metrics file: the rows resolved so far are the progress bar's."""
    s, t = core.stats, invocation.tally
    failed = progress.failed + reused.failed
    return Figures(job=invocation.job_name, rows={"succeeded": progress.done - failed, "failed": failed,
                                               "pending": rows - progress.done},
                   requests=dict(t.by_class), rate_limited=t.rate_limited, prompt_tokens=s.prompt_tokens,
                   completion_tokens=s.completion_tokens, run_cost_usd=s.cost_usd,
                   job_cost_usd=spent_before + s.cost_usd, last_success=t.last_success,
                   started=invocation.started, running=True, cached_tokens=s.cached_tokens,
                   cache_saved_usd=s.cache_saved_usd)


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


def prompt_cache_figures(cfg: Config, job_cache: tuple[int, int], job_prompt_tokens: int,
                         stats: Stats) -> dict[str, Any]:
    """summary.json's prompt_cache: the job's cached and cache-write prompt tokens, their share of the
    prompt tokens, and what they saved at the model's table prices (this run's saving as counted)."""
    cached, written = job_cache
    price = find_price(cfg, cfg.endpoint.model, batch=cfg.run.mode == "batch")
    saved = cache_saving(price, PromptCache(cached, written)) if price is not None else 0.0
    return {"cached_tokens": cached, "cache_write_tokens": written,
            "hit_share": round(cached / job_prompt_tokens, 4) if job_prompt_tokens else 0.0,
            "saved_usd": round(saved, 6), "run_cached_tokens": stats.cached_tokens,
            "run_saved_usd": round(stats.cache_saved_usd, 6)}
