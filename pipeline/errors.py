"""One exception tree for the whole pipeline.

    PipelineError
    ├── UsageError              bad config, input or command line; nothing was sent (exit 2)
    │   ├── ConfigError         names the config key and file
    │   ├── InputError          names the input file and row or line
    │   ├── JobChangedError     the output dir holds answers to a different job
    │   ├── StoreLockedError    another runner owns the output dir
    │   ├── StoreDamagedError   store.sqlite is not a readable database: set it aside (the message says how)
    │   ├── UnsafePathError     a link (or a non-plain file) where the runner would write in the output dir
    │   └── StateVersionError   the output dir was written by a newer version of the pipeline
    ├── InputChangedError       an input file changed while it was read: stopped unmixed (exit 3)
    ├── RowError                one input row cannot become a request (a failure row, the run goes on)
    ├── RequestError            what one attempt of one request ended in (status, code, retry-after)
    │   ├── TransientError      retry with jittered backoff (408, 5xx, timeouts, resets, 200-with-error)
    │   │   └── RateLimited     429 rate limit: the whole client pauses, not just this request
    │   ├── PermanentError      record as a failure, never retry (400, 404, 413, 422, too large for TPM)
    │   ├── BadContentError     not JSON, fails the schema, truncated, refused: a small separate budget
    │   └── FatalReply          an answer no other request can get past either: the run stops (exit 3)
    │       ├── AuthError       401/403: the key is wrong or lacks permission
    │       └── CreditsError    402, 429 insufficient_quota and the spend-limit codes
    ├── RunFatalError           no request can succeed: stop dispatching, keep what is done (exit 3)
    │   ├── EndpointGone        nothing connects for long enough, or a Batch API call keeps failing
    │   └── BudgetExceeded      budget.max_cost_usd would be exceeded
    ├── InternalError           a broken invariant of our own: a bug, not the user's doing (exit 70)
    └── Stopped                 dispatch has stopped; the request stays pending (never leaves the engine)

Exit codes that are outcomes, not exceptions: 0 every row succeeded, 1 finished with failed rows, 4 finished
but the quality gate failed (quality.audit.min_agreement: outputs written, nothing published), 75 batches
submitted and still running, 130 interrupted.

An InternalError, or any other exception that escapes a command, is a bug: exit 70 (EXIT_INTERNAL),
the traceback in a file (diagnosis.py). Every error carries typed fields and a message that says what
to do next. No message may ever contain the API key: errors are built from status codes and response
bodies, never from request headers, and the transport scrubs echoed secrets from them (send/redact.py).
A run stops on a `FatalReply` or a `RunFatalError`; both carry `hint`, the next step to print.
"""
from __future__ import annotations

from typing import Any, Literal

ErrorClass = Literal["transient", "permanent", "bad_content", "run_fatal", "input", "interrupted"]

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
# Finished, but the audit's agreement with the reference model may be under quality.audit.min_agreement:
# outputs written, output.publish skipped (write/quality.py).
EXIT_QUALITY_GATE = 4
EXIT_INTERNAL = 70  # a bug: the store is consistent; re-run after the fix (diagnosis.report_internal)
# run.mode: batch with --no-wait: batches are running at the provider; run the same command again to collect.
EXIT_BATCH_SUBMITTED = 75
EXIT_INTERRUPTED = 130
# The reader of stdout went away (`pipeline show OUT ID | head -1`): ended quietly, with the status a shell
# reports for a Unix tool that SIGPIPE ended (128 + 13).
EXIT_BROKEN_PIPE = 141


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(PipelineError):
    """The run cannot start: fix the config, the input or the command line. Nothing was sent."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config value is wrong; `key` is its dotted path and `file` the config file, when known."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        self.key = key
        self.file = file
        self.detail = message
        where = ""
        if file and key:
            where = f"{file}: {key}: "
        elif file:
            where = f"{file}: "
        elif key:
            where = f"{key}: "
        super().__init__(where + message)

    def located(self, file: str) -> ConfigError:
        """The same error, naming the config file (for checks that only see one section)."""
        return self if self.file else ConfigError(self.detail, key=self.key, file=file)


class InputError(UsageError):
    """The input cannot be read as a whole (not one row of it); names the file and row or line."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None) -> None:
        self.file = file
        self.row = row
        where = file or ""
        if row is not None:
            where += f" row {row}" if where else f"row {row}"
        super().__init__(f"{where}: {message}" if where else message)


class JobChangedError(UsageError):
    """The output directory holds a different job; mixing answers would be silently wrong."""


class StoreLockedError(UsageError):
    """Another live process is writing the same output directory."""


class StoreDamagedError(UsageError):
    """store.sqlite cannot be read as a database: it must be set aside by hand (the message says how)."""


class UnsafePathError(UsageError):
    """Something in the output folder is a link (or otherwise not ours to write); nothing was written."""


class StateVersionError(UsageError):
    """The store or manifest was written by a newer version: reading it could silently go wrong."""


class InputChangedError(PipelineError):
    """An input file changed while this run read it (another job still writing it, or overwriting it).

    Raised before any row of the new version is used, so the outputs never mix two versions. Exit 3:
    what was answered is kept; re-run once the file is complete (only new requests are sent)."""

    exit_code = EXIT_STOPPED

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        super().__init__(
            f"{path}: the input file changed while it was being read ({what}); stopped before rows of two "
            "versions could mix. Re-run once whatever writes it has finished (answers so far are kept)."
        )


class RowError(PipelineError):
    """One row cannot be turned into a request; it becomes a failure row and the run goes on.

    `reason` groups failures for the dry run's report: input (unparsable line), missing_column,
    null_value, template, image, context (over the window), param (bad per-row parameter).
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 reason: str = "input") -> None:
        self.file = file
        self.row = row
        self.message = message
        self.reason = reason
        where = f"{file} row {row}: " if file is not None and row is not None else ""
        super().__init__(where + message)


class RequestError(PipelineError):
    """The outcome of one attempt of one request that did not produce a usable answer."""

    error_class: ErrorClass = "transient"
    # The body of a failed attempt the provider billed anyway (partial output, usage): it counts as spend.
    billed: dict[str, Any] | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        content: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.content = content
        prefix = f"HTTP {status}: " if status else ""
        super().__init__(prefix + message)


class TransientError(RequestError):
    """Another attempt may well succeed: a 5xx, a timeout, a reset, a 200 that carries an error."""

    error_class = "transient"


class RateLimited(TransientError):
    """A 429 rate limit; `retry_after` is how long the whole client should wait, if the server said."""


class PermanentError(RequestError):
    """This request will never succeed as it is (400, 404, 413, 422): record it as a failure row."""

    error_class = "permanent"


class BadContentError(RequestError):
    """The model answered but the answer is unusable; `reason` says why."""

    error_class = "bad_content"

    def __init__(self, message: str, *, reason: str, content: str | None = None, **kw: object) -> None:
        self.reason = reason
        super().__init__(message, content=content, **kw)  # type: ignore[arg-type]


class FatalReply(RequestError):
    """An answer that says no request of this run can succeed (the key, the credits): stop the run."""

    error_class = "run_fatal"
    exit_code = EXIT_STOPPED
    hint = "fix the cause, then re-run the same command to resume"


class AuthError(FatalReply):
    """401, or a 403 about the key (not a moderation block on one row's content)."""

    hint = "check the API key in the environment variable named by endpoint.api_key_env, then re-run to resume"


class CreditsError(FatalReply):
    """No credits or quota left: 402, 429 insufficient_quota and the spend-limit codes."""

    hint = "add credits or raise the key's limit (or lower params.max_tokens), then re-run to resume"


class RunFatalError(PipelineError):
    """No further request can succeed (not because of one answer's body); stop the run, keep what is done."""

    exit_code = EXIT_STOPPED
    hint = "fix the cause, then re-run the same command to resume"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        super().__init__(message)


class EndpointGone(RunFatalError):
    """The endpoint stopped answering: every attempt failed to connect (refused, DNS, TLS) for long enough,
    or one of the Batch API's calls failed transiently `limits.max_retries` times in a row (batch/calls.py)."""

    hint = "check endpoint.base_url and the network, then re-run the same command to resume"


class BudgetExceeded(RunFatalError):
    """Sending the next request could take the job's cost over budget.max_cost_usd."""

    hint = "raise budget.max_cost_usd (e.g. --set budget.max_cost_usd=50), then re-run to resume"


class InternalError(PipelineError):
    """One of our own invariants does not hold: a bug to report, not something the user can fix."""

    exit_code = EXIT_INTERNAL


class Stopped(PipelineError):
    """Dispatch has stopped (run-fatal, budget or interrupt); the request stays pending, to resume.

    Raised inside the engine to unwind a request that will not be sent; never reaches the user."""

    exit_code = EXIT_STOPPED


# Why a run stopped: an answer that said so, or a condition of the run itself.
Fatal = FatalReply | RunFatalError
