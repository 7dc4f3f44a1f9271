"""`output.dir/pipeline.log`: what happened during a run, as JSON lines an operator can read (contract 2).

Code anywhere emits through `logging.getLogger("pipeline")`, structured events with
`extra={"event": NAME, ...fields}`; each line is {"ts": ISO-8601 UTC, "level", "event", "msg", ...fields}.
Any extra field is written as it is, so events added later appear without changes here. Plain log calls
get the event "log"; a record with exc_info gets its traceback. The file rotates by size (10 MB, 3 old
files kept: pipeline.log.1 ...). It is opened without following links (a shared output folder may hold
a planted one). `-v` mirrors the same records to stderr in a human form (HumanFormatter).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..common import layout, redact
from ..common.terminal import printable

LOG_FILE = layout.LOG
MAX_BYTES = 10 * 2**20
BACKUPS = 3
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "event"}


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The extra fields a call passed (everything that is not a standard LogRecord attribute)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": iso_utc(record.created), "level": record.levelname,
                               "event": getattr(record, "event", None) or "log", "msg": record.getMessage()}
        out.update(fields(record))
        if record.exc_info and "traceback" not in out:
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        # Extra fields and tracebacks (causes included) are not seen by redact's record factory: scrub the line.
        return redact.scrub(orjson.dumps(out, default=str).decode())


class HumanFormatter(logging.Formatter):
    """stderr: time, level, event, message and the fields as key=value. `full_time` (stderr is not a
    terminal: cron appends night after night to one file): the date and time in UTC, not only the time."""

    def __init__(self, *, full_time: bool = False) -> None:
        super().__init__()
        self.full_time = full_time

    def format(self, record: logging.LogRecord) -> str:
        extra = fields(record)
        trace = extra.pop("traceback", None)
        event = getattr(record, "event", None)
        when = iso_utc(record.created)[:19] + "Z" if self.full_time else self.formatTime(record, "%H:%M:%S")
        text = f"{when} {record.levelname:<7} "
        text += f"{event}: {record.getMessage()}" if event else f"{record.name}: {record.getMessage()}"
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        # A message may quote a server (an error body, an answer): shown on a terminal, never obeyed.
        text = printable(text)
        if trace:
            text += "\n" + printable(str(trace).rstrip(), lines=True)
        elif record.exc_info:
            text += "\n" + printable(self.formatException(record.exc_info), lines=True)
        return redact.scrub(text)


class JsonLinesHandler(logging.handlers.RotatingFileHandler):
    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(JsonFormatter())

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        return os.fdopen(fd, "a", encoding="utf-8")


class LogFile:
    """The job's log for the duration of one run: added to the `pipeline` logger, removed at the end.

    The logger is lowered to INFO while attached (so the file gets every event even under -q); what a
    terminal shows is decided by the stderr handler's own level (the CLI sets it)."""

    def __init__(self, out_dir: Path) -> None:
        self.handler = JsonLinesHandler(out_dir / LOG_FILE)  # opened now: an OSError is the caller's to report
        self.handler.setLevel(logging.INFO)
        self.logger = logging.getLogger("pipeline")
        self._level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.setLevel(self._level)
