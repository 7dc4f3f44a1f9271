"""What one run carries, in one object the drivers share: the invocation's options and the run's parts.

`RunOptions` is what the command line (or `pipeline.run(...)`) asks of this invocation beside the config:
none of it is part of the job. `RunContext` holds what a run builds once and every later step uses: the
config and options, the job folder and its answer store, the input, the prompt renderer and structured
plan, the core (limits, budget, stats inside it), progress, the invocation record (history, log, metrics,
webhook) and the commands that resume. The local driver (engines/runner.py) builds one; batch mode
(batch/mode.py) runs inside it; the steps take it instead of a dozen arguments each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:  # the types only: the local driver builds the parts
    from ..config import Config
    from ..ops.invocation import Invocation
    from ..prepare.prompts import Renderer
    from ..prepare.structured import StructuredPlan
    from ..read.reader import Source
    from ..read.scan import InputScan
    from ..state.answers import LocalAnswers
    from ..state.jobdir import JobDir
    from ..state.store import PartCounts, Store
    from ..write.output import OutputColumns
    from .finish import RowCount
    from .interrupt import Interrupt
    from .progress import Progress
    from .transformer import Core


class RunFlags(TypedDict, total=False):
    """The keyword flags of `run_async(...)` (the fields of RunOptions)."""

    retry_failed: bool
    force_new: bool
    quiet: bool
    handle_signals: bool
    no_wait: bool
    cancel_batches: bool
    config_path: str | None
    overrides: list[str] | None


@dataclass(frozen=True, slots=True)
class RunOptions:
    """This invocation's flags. `config_path` and `overrides` (the --set items) only shape the printed
    commands that resume; `no_wait` and `cancel_batches` apply to run.mode: batch."""

    retry_failed: bool = False
    force_new: bool = False
    quiet: bool = False
    handle_signals: bool = False
    no_wait: bool = False
    cancel_batches: bool = False
    config_path: str | None = None
    overrides: list[str] | None = None


@dataclass(slots=True)
class RunContext:
    """One local run, from the job check to the summary (see the module docstring)."""

    cfg: Config
    options: RunOptions
    invocation: Invocation
    jobdir: JobDir
    source: Source
    scan: InputScan
    renderer: Renderer
    plan: StructuredPlan | None
    store: Store
    answers: LocalAnswers
    core: Core
    progress: Progress
    interrupt: Interrupt
    columns: OutputColumns
    names: list[str]           # each input batch's part name (its content and the part context)
    reuse: set[str]            # parts usable as they are: their batches are not read again
    reused: PartCounts         # the rows those parts hold
    rows: RowCount
    commands: tuple[str, str]  # the command that resumes, and the one that retries failed rows
    started: float             # time.monotonic() at the start
    spent_before: float = 0.0  # what earlier runs of the job spent

    @property
    def total(self) -> int:
        return self.scan.rows
