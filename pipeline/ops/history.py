"""The job's run history: `output.dir/history.jsonl`, one JSON object per invocation (contract 3).

Every `pipeline run` appends exactly one record when it ends, whatever the end: finished, stopped,
refused (a changed job, a held lock, bad input) or crashed. A record is one `write()` of one line to a
file opened with O_APPEND, so concurrent writers (a run and a refused second run) never interleave
inside a line; O_NOFOLLOW because the output folder may be shared and a planted link must not redirect
our write. A torn last line (power loss mid-write) is skipped when reading.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..common import layout, redact

HISTORY_FILE = layout.HISTORY
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RunRecord:
    """What one invocation did; `stop_reason` is null for a run that finished (exit 0 or 1)."""

    run_id: str
    started_at: str
    finished_at: str
    exit_code: int
    rows_total: int = 0
    rows_new: int = 0
    rows_edited: int = 0
    rows_retried: int = 0
    rows_reused: int = 0
    rows_input_failed: int = 0
    rows_removed: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    requests: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0            # this run's spend, not the job's total
    cached_tokens: int = 0           # prompt tokens this run's answers read from the provider's cache
    cache_saved_usd: float = 0.0     # what that saved against the full input price
    stop_reason: str | None = None   # fatal | budget | interrupted | incomplete | refused | input_changed | error
    message: str | None = None       # why it stopped or was refused
    quality: dict[str, Any] | None = None  # the audit's agreement and the gate, when quality is on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def append(out_dir: str | os.PathLike[str], record: RunRecord) -> None:
    """Append one record (one line, one write) without following a link at the history's path."""
    # The message may quote a server (a stop, an error): scrubbed like everything else that is kept.
    line = redact.scrub_bytes(orjson.dumps(record.to_json())) + b"\n"
    fd = os.open(Path(out_dir) / HISTORY_FILE, _OPEN_FLAGS, 0o644)
    try:
        written = os.write(fd, line)
        while written < len(line):  # a short write (signal, full disk): finish the line, never leave half
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)


def read(out_dir: str | os.PathLike[str], last: int | None = None) -> list[dict[str, Any]]:
    """The records, oldest first (the `last` ones only when given); unreadable lines are skipped."""
    path = Path(out_dir) / HISTORY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse(data, last)


def parse(data: bytes, last: int | None = None) -> list[dict[str, Any]]:
    """history.jsonl's records from its bytes (local or an object), oldest first; torn lines skipped."""
    records = []
    for line in data.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records[-last:] if last else records
