"""The output folder as a job: who owns it, what job it holds, where its pieces live.

    out/
      .lock              flock'ed by the running process (released by the kernel even on kill -9)
      manifest.json      job fingerprint, input scan, layout; versioned, written atomically
      store.sqlite       every paid response (store.py)
      parts/             per-batch outputs (output.py)
      results.parquet, failures.parquet, summary.json

A second runner on the same folder is refused while the first holds the lock; a lock left by a dead
process is simply free again (flock), so there is no stale-lock guessing. A manifest whose request
fingerprint differs from the config's means answers to a different job: refuse (exit 2) naming the
changed keys, unless `--force-new`, which moves the old job aside (never deletes paid answers).

A resume keeps the job's batch size (`adopt_batch_size`, before the input scan) and skips the batches
whose parts are complete, except those holding rows that must be asked again (`resume_plan`).
"""
from __future__ import annotations

import fcntl
import os
import shlex
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import Config
from ..errors import InternalError, JobChangedError, StateVersionError, StoreLockedError, UsageError
from ..write.output import done_parts, write_json_atomic
from ..read.reader import InputScan
from .store import PartCounts, Store

MANIFEST_VERSION = 1


class JobDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.parts = self.path / "parts"
        self.store_path = str(self.path / "store.sqlite")
        self.manifest_path = self.path / "manifest.json"
        self._lock_fd: int | None = None

    # -- ownership -------------------------------------------------------------------------------

    def lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.parts.mkdir(exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(
                f"output.dir {self.path} is not writable ({exc.strerror}); choose another folder with "
                "--set output.dir=..."
            ) from None
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{self.path} is in use by another run ({owner}); wait for it to finish, stop it, or use "
                "another output.dir. `pipeline status` shows its progress."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def owner(self) -> dict[str, Any] | None:
        """Who is running this job now, or None. Used by `pipeline status` from another process."""
        lock = self.path / ".lock"
        if not lock.exists():
            return None
        fd = os.open(lock, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _parse_owner(fd) or {"pid": None}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # -- identity --------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = orjson.loads(self.manifest_path.read_bytes())
        except orjson.JSONDecodeError:
            return None
        if not isinstance(manifest, dict):
            return None
        version = manifest.get("version", 1)
        if isinstance(version, int) and version > MANIFEST_VERSION:
            raise StateVersionError(
                f"{self.manifest_path} is version {version}, written by a newer pipeline than this one (which "
                f"reads up to {MANIFEST_VERSION}); run that version, or use another output.dir")
        return manifest

    def adopt_batch_size(self, cfg: Config) -> None:
        """A resumed job keeps the batch size it started with: parts are numbered by batch and the input
        scan records where each batch starts, so this must run before the input is scanned."""
        current = self.read_manifest()
        if current is not None and current.get("fingerprint") == cfg.request_fingerprint() and "batch_size" in current:
            cfg.input.batch_size = int(current["batch_size"])

    def check_job(self, cfg: Config, scan: InputScan, *, force_new: bool, config_path: str,
                  command: str | None = None) -> dict[str, Any]:
        """Refuse to mix two jobs in one folder, naming what changed; returns the manifest to use.
        `command` is how the user ran this job (to show the --force-new variant of it)."""
        fingerprint = cfg.request_fingerprint()
        request = cfg.request_config()
        current = self.read_manifest()
        has_answers = Path(self.store_path).exists() or any(self.parts.glob("*.parquet"))
        if current is not None and has_answers:
            changed = []
            if current.get("fingerprint") != fingerprint:
                keys = _changed_keys(current["request"], request) if "request" in current else []
                named = ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
                changed.append(named or "the request-affecting config (prompt, model, params, structured, input settings)")
            if current.get("input_fingerprint") != scan.fingerprint:
                changed.append("the input files (size or modification time)")
            if changed and not force_new:
                raise JobChangedError(
                    f"{self.path} holds answers to a different job: {' and '.join(changed)} changed since it "
                    f"started, so its answers do not fit these requests. Use a new output.dir, or re-run with "
                    f"--force-new to move the old job aside (nothing is deleted): "
                    f"{command or 'pipeline run ' + config_path} --force-new"
                )
            if changed:
                self._move_aside()
                current = None
        if current is None or not has_answers:
            current = {
                "version": MANIFEST_VERSION,
                "fingerprint": fingerprint,
                "input_fingerprint": scan.fingerprint,
                "rows_total": scan.rows,
                "batch_size": cfg.input.batch_size,
                "model": cfg.endpoint.model,
                "config": config_path,
                "request": request,
                "created": time.time(),
            }
        elif int(current.get("batch_size", cfg.input.batch_size)) != cfg.input.batch_size:
            # Parts hold fixed row ranges: a scan made with another batch size would address wrong rows.
            raise InternalError(f"{self.path} was batched by {current['batch_size']} rows but the input was "
                             f"scanned with {cfg.input.batch_size}; call adopt_batch_size() before scanning")  # noqa: E501
        current["updated"] = time.time()
        if command:
            current["command"] = command  # what `pipeline status` shows as the way to resume
        write_json_atomic(self.manifest_path, orjson.dumps(current, option=orjson.OPT_INDENT_2))
        return current

    # -- resuming --------------------------------------------------------------------------------

    def resume_plan(self, store: Store, *, retry_failed: bool) -> tuple[set[int], int]:
        """The finished batches a resume skips, and how many rows they hold.

        A finished batch is reopened when it has rows a resume must ask again: rows whose retries ran out
        on transient errors (always: a later run may well get through), and with --retry-failed every row
        whose request failed. Counts come from the store's part index, so nothing here grows with the
        job beyond one small row per batch; a part whose index row a kill prevented is counted from its
        files, once."""
        on_disk = done_parts(self.parts)
        index = store.parts()
        for i in sorted(on_disk - index.keys()):
            index[i] = count_part(self.parts, i)
            store.put_part(i, **asdict(index[i]))
        skip: set[int] = set()
        rows = 0
        for i in on_disk:
            c = index[i]
            if c.failed_transient or (retry_failed and c.request_failed):
                continue
            skip.add(i)
            rows += c.ok + c.failed
        return skip, rows

    def _move_aside(self) -> None:
        aside = self.path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "parts", "manifest.json",
                     "results.parquet", "failures.parquet", "summary.json"):
            src = self.path / name
            if src.exists():
                os.replace(src, aside / name)
        self.parts.mkdir(exist_ok=True)


def _read_owner(fd: int) -> str:
    info = _parse_owner(fd)
    if not info:
        return "owner unknown"
    return f"pid {info.get('pid')} on {info.get('host')}"


def _parse_owner(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        return orjson.loads(data) if data else None
    except (OSError, orjson.JSONDecodeError):
        return None


def resume_command(config_path: str | None, overrides: list[str] | None, *, retry_failed: bool) -> str:
    """The command that continues this job: the config path as given plus every --set, shell-quoted."""
    if not config_path or config_path == "<dict>":
        call, flag = ("pipeline.run(..., retry_failed=True)", " --retry-failed") if retry_failed else ("pipeline.run(...)", "")
        return f"the same {call} call (or `pipeline run CONFIG{flag}` with this job's config file)"
    argv = ["pipeline", "run", config_path]
    for item in overrides or ():
        argv += ["--set", item]
    if retry_failed:
        argv.append("--retry-failed")
    return shlex.join(argv)


def count_part(parts: Path, index: int) -> PartCounts:
    """A finished batch's counts read from its part files (footer, and the failures' error_class)."""
    ok = pq.ParquetFile(parts / f"{index:08d}.r.parquet").metadata.num_rows
    f = parts / f"{index:08d}.f.parquet"
    if not f.exists():
        return PartCounts(ok, 0, 0, 0)
    classes = pq.read_table(f, columns=["error_class"]).column("error_class")
    transient = pc.sum(pc.equal(classes, "transient")).as_py() or 0
    from_input = pc.sum(pc.equal(classes, "input")).as_py() or 0
    return PartCounts(ok, len(classes), transient, len(classes) - from_input)


_MISSING = object()


def _changed_keys(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted keys whose values differ, two levels deep at most (`prompt.user`, `structured.schema`)."""
    if isinstance(old, dict) and isinstance(new, dict) and depth < 2:
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.", depth + 1)
        return out
    return [] if old == new else [prefix.rstrip(".")]
