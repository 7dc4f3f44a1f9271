"""The part files in a job's parts/ folder: their names, and reads that never follow a link.

A finished batch is `NAME.r.parquet` (+ `NAME.f.parquet` for its failures), NAME being the batch's content
name (`part_names`: its content digest and the part context, so an unchanged batch keeps its name and its
part across runs, on the local engine and on Ray alike); `.pr`/`.pf` are a batch still being written. The
writer (write/output.py), the job folder (state/jobdir.py) and status (reporting/status.py) all read parts
through here.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
import pyarrow as pa

from ..errors import UsageError
from . import safefs

T = TypeVar("T")
PART_RE = re.compile(r"^([0-9a-f]{16})\.r\.parquet$")
PARTIAL_RE = re.compile(r"^([0-9a-f]{16})\.p[rf]\.parquet$")
# Any part file of any format (older jobs numbered their parts): what pruning may remove.
ANY_PART_RE = re.compile(r"^([0-9a-f]{8,16})\.p?[rf]\.parquet(?:\.tmp)?$")
PART_FORMAT = 2        # 2: parts named by batch content instead of batch number


class OutputShape(Protocol):
    """What a part's columns depend on besides its rows (write/output.py OutputColumns has it)."""

    schema: dict[str, Any] | None
    with_tool_calls: bool
    with_logprobs: bool
    with_ttft: bool
    confidence_fields: list[str] | None
    cascade: bool
    audit_fields: list[str] | None
    decisions: dict[str, Any] | None


def part_context(carried_types: dict[str, str], id_column: str, columns: OutputShape) -> bytes:
    """What shapes a part besides its batch's rows: the columns and types it is written with."""
    shape = {"version": PART_FORMAT, "id": id_column, "carried": carried_types, "schema": columns.schema,
             "tool_calls": columns.with_tool_calls, "logprobs": columns.with_logprobs, "ttft": columns.with_ttft}
    if columns.confidence_fields is not None or columns.cascade or columns.audit_fields is not None:
        # Only with the features on, so older jobs keep their part names.
        shape["quality"] = [columns.confidence_fields, columns.cascade, columns.audit_fields, columns.decisions]
    return orjson.dumps(shape, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)


def part_names(digests: list[bytes], context: bytes) -> list[str]:
    """Each batch's part name: its content digest and the part context, as 16 hex characters."""
    ctx = hashlib.blake2b(context, digest_size=8).digest()
    return [hashlib.blake2b(d + ctx, digest_size=8).hexdigest() for d in digests]


def part_number(name: str) -> int:
    """A part name as the store's part index keys it (a signed 64-bit integer)."""
    return int.from_bytes(bytes.fromhex(name), "big", signed=True)


def drop_partial_parts(parts_dir: Path) -> None:
    """A resume recomputes unfinished batches; their partial parts from the last stop must go."""
    if parts_dir.is_dir():
        for name in os.listdir(parts_dir):
            if PARTIAL_RE.match(name):
                os.unlink(parts_dir / name)


def done_parts(parts_dir: Path) -> set[str]:
    """Finished batches: their results part is a regular file (a link planted in parts/ counts for nothing)."""
    if not parts_dir.is_dir():
        return set()
    with os.scandir(parts_dir) as entries:
        return {m.group(1) for e in entries if (m := PART_RE.match(e.name)) and e.is_file(follow_symlinks=False)}


def read_part(path: Path, read: Callable[..., T], **kw: Any) -> T:
    """`read(file)`, or a UsageError naming a damaged part file and what to do (the folder may be shared).
    Opened without following links: a link planted in parts/ is refused, never read (its target's rows
    would land in the outputs)."""
    fh = safefs.open_read(path)
    if fh is None:
        raise safefs.refuse(path, "missing, a link or not a plain file")
    try:
        with fh:
            return read(fh, **kw)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException) and exc.errno is not None:
            raise  # a disk or permission problem: diagnosis says which
        raise UsageError(f"the part file {path} is damaged ({exc}); delete it and re-run the same command: its batch "
                         "is rebuilt from the answers in store.sqlite, nothing is asked again") from None
