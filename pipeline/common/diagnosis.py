"""What to say when a command ends in an exception that is not one of ours (a PipelineError).

Two kinds. The environment failed (`explain`): a full disk, too many open files, a damaged store, a
permission: say which, name the file, and say what fixes it; the exit code says whether re-running
the same command after the fix resumes (3) or something must be changed first (2). Anything else is
a bug (`report_internal`): exit 70, never a code that means "finished with failed rows" (1) or "finished,
but the quality gate failed" (4, write/quality.py). By then the
runner's `finally` blocks have closed the store (every committed answer is kept); the traceback goes
to a new file in output.dir (created without following links, scrubbed of secrets) and one line says
where.
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import time
import traceback

from ..errors import EXIT_INTERNAL, EXIT_STOPPED, EXIT_USAGE
from . import layout, redact, safefs
from .terminal import printable

log = logging.getLogger("pipeline")

_NO_SPACE = "no space left on device"


def damaged_store_message(store: str, detail: str) -> str:
    return (f"the answer store {store} is damaged ({detail}); set it aside and start the job's store afresh: "
            f"mv {store} {store}.damaged (and any {store}-wal / -shm beside it), then re-run; rows whose answers "
            "were in it are asked again")

# States a resume does not request again; `--retry-failed` narrows this to "ok" only.
FINAL_STATES = frozenset({"ok", "permanent", "bad_content"})


def explain(exc: BaseException, out_dir: str | None, max_concurrency: int | None = None) -> tuple[str, int] | None:
    """(message, exit code) for a failure of the environment, or None when it is a bug."""
    if isinstance(exc, sqlite3.Error):
        return _sqlite(exc, out_dir)
    if not isinstance(exc, OSError):
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = _NO_SPACE if code == errno.ENOSPC else "disk quota exceeded"
        return (f"{what}{where}: free space on the disk holding {out_dir or 'output.dir'}, then re-run the same "
                "command to resume (every answer committed so far is kept)", EXIT_STOPPED)
    if code in (errno.EMFILE, errno.ENFILE):
        now = f" (now {max_concurrency})" if max_concurrency else ""
        return (f"too many open files{where}: lower limits.max_concurrency{now} or raise the limit with "
                "`ulimit -n 4096`, then re-run the same command to resume", EXIT_STOPPED)
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied{where}: give this user access (or choose another output.dir with "
                "--set output.dir=...), then re-run the same command", EXIT_USAGE)
    if code == errno.EROFS:
        return f"read-only file system{where}: choose another output.dir with --set output.dir=...", EXIT_USAGE
    if code == errno.EIO:
        return (f"the disk reported an I/O error{where} (failing hardware or a lost network mount; see dmesg); "
                "fix the disk, then re-run the same command to resume", EXIT_STOPPED)
    return None


def _sqlite(exc: sqlite3.Error, out_dir: str | None) -> tuple[str, int] | None:
    text = str(exc).lower()
    store = os.path.join(out_dir, "store.sqlite") if out_dir else "store.sqlite"
    if "disk is full" in text or "disk full" in text:
        return (f"{_NO_SPACE} (writing {store}): free space, then re-run the same command to resume "
                "(every answer committed so far is kept)", EXIT_STOPPED)
    if "malformed" in text or "not a database" in text or "file is encrypted" in text:
        return (damaged_store_message(store, str(exc)), EXIT_USAGE)
    if "disk i/o error" in text:
        return (f"the disk reported an I/O error writing {store} (see dmesg); fix the disk, then re-run the same "
                "command to resume", EXIT_STOPPED)
    if "unable to open database" in text:
        return (f"cannot open the answer store {store}: check the folder's permissions and free space", EXIT_USAGE)
    return None


def report_internal(exc: BaseException, out_dir: str | None) -> int:
    """Write the traceback to a file (output.dir if known), print one line saying where; return 70."""
    text = redact.scrub("".join(traceback.format_exception(exc)))
    body = (f"pipeline internal error at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            f"python {platform.python_version()} on {platform.platform()}\n"
            f"argv: {redact.scrub(' '.join(sys.argv))}\n\n{text}")
    path = _write_report(body.encode(), out_dir)
    # For pipeline.log (the event contract); at DEBUG so the console shows only the one line printed below.
    log.debug("internal error: traceback in %s", path, extra={"event": "internal_error", "traceback": text})
    detail = printable(redact.scrub(f"{type(exc).__name__}: {exc}")[:300])
    print(f"internal error (a bug, exit 70): {detail}; the traceback is in {path}. Answers received so far "
          "are kept; please report it, and re-run the same command after the fix to resume.", file=sys.stderr)
    return EXIT_INTERNAL


def _write_report(body: bytes, out_dir: str | None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if out_dir and os.path.isdir(out_dir):
        path = os.path.join(out_dir, f"{layout.INTERNAL_ERROR_PREFIX}{stamp}-{os.getpid()}.txt")
        try:
            safefs.write_new(path, body)
            return path
        except OSError:
            pass  # a full or read-only folder: the temp dir still works
    fd, path = tempfile.mkstemp(prefix=f"pipeline-internal-error-{stamp}-", suffix=".txt")
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
    return path
