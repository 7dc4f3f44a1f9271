"""The output folder as a job: who owns it, what job it holds, where its pieces live.

    out/
      .lock              flock'ed by the running process (released by the kernel even on kill -9)
      manifest.json      job fingerprint, input scan, layout; versioned, written atomically
      store.sqlite       every paid response (store.py)
      parts/             per-batch outputs (output.py)
      results.parquet, failures.parquet, summary.json

A second runner on the same folder is refused while the first holds the lock; a lock left by a dead
process is simply free again (flock), so there is no stale-lock guessing. A manifest whose request
fingerprint differs from the config's means answers to a different job: refuse (exit 2) unless
`--force-new`, which moves the old job aside (never deletes paid answers).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from .config import Config
from .errors import JobChangedError, StoreLockedError, UsageError
from .output import write_json_atomic
from .reader import InputScan

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
            return orjson.loads(self.manifest_path.read_bytes())
        except orjson.JSONDecodeError:
            return None

    def check_job(self, cfg: Config, scan: InputScan, *, force_new: bool, config_path: str) -> dict[str, Any]:
        """Refuse to mix two jobs in one folder; returns the manifest to use."""
        fingerprint = cfg.request_fingerprint()
        current = self.read_manifest()
        has_answers = Path(self.store_path).exists() or any(self.parts.glob("*.parquet"))
        if current is not None and has_answers:
            changed = []
            if current.get("fingerprint") != fingerprint:
                changed.append("the request-affecting config (prompt, model, params, structured, input settings)")
            if current.get("input_fingerprint") != scan.fingerprint:
                changed.append("the input files (size or modification time)")
            if changed and not force_new:
                raise JobChangedError(
                    f"{self.path} holds answers to a different job: {' and '.join(changed)} changed since it "
                    f"started. Use a new output.dir, or re-run with --force-new to move the old job aside "
                    f"(nothing is deleted): pipeline run {config_path} --force-new"
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
                "created": time.time(),
            }
        else:
            # The batch size fixes which rows each part holds: keep the job's own.
            cfg.input.batch_size = int(current.get("batch_size", cfg.input.batch_size))
        current["updated"] = time.time()
        write_json_atomic(self.manifest_path, orjson.dumps(current, option=orjson.OPT_INDENT_2))
        return current

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
