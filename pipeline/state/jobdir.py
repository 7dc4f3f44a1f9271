"""The output folder as a job: who owns it, what job it holds, where its pieces live.

    out/
      .lock              flock'ed by the running process (released by the kernel even on kill -9)
      manifest.json      job identity (request fingerprint), this run's batches; versioned, atomic
      store.sqlite       every paid response (store.py); the job identity again, in `meta`
      parts/             one pair of part files per batch content (output.py)
      results.parquet, failures.parquet, summary.json

A second runner on the same folder is refused while the first holds the lock; a lock left by a dead
process is simply free again (flock), so there is no stale-lock guessing.

A job is what shapes its requests; the input is data that may change between runs. A store or
manifest whose request fingerprint differs from the config's means answers to a different job: refuse
(exit 2) naming the changed keys, unless `--force-new`, which moves the old job aside (never deletes
paid answers). Every run reads the whole input; a batch whose content digest (reader.py) and part
context are unchanged reuses its part without rendering (`reusable`), every other batch is rendered
and answered from the store where it can, and parts of batches the input no longer has are pruned
once the outputs are written, so the outputs always match this run's input.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import socket
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..common import layout, redact, safefs
from ..common.parts import ANY_PART_RE, done_parts, part_number, read_part
from ..config import Config
from ..config.job import NOT_IDENTITY
from ..errors import (
    JobChangedError,
    StateVersionError,
    StoreLockedError,
    UnsafePathError,
    UsageError,
)
from .store import PartCounts, Store

MANIFEST_VERSION = 2   # 2: no input fingerprint (input is data); `batches` names this run's parts
IDENTITY_META = "job_identity"
log = logging.getLogger("pipeline")
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")  # safefs.temp_name


class JobDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.parts = self.path / layout.PARTS
        self.store_path = str(self.path / layout.STORE)
        self.manifest_path = self.path / layout.MANIFEST
        self._lock_fd: int | None = None

    # -- ownership -------------------------------------------------------------------------------

    def lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)  # output.dir itself may be a link; nothing inside may
            safefs.ensure_dir(self.parts)
            probe = safefs.temp_name(self.path / ".write-test")
            os.close(safefs.open_new(probe))
            probe.unlink()
        except UnsafePathError:
            raise
        except OSError as exc:
            raise UsageError(
                f"output.dir {self.path} is not writable ({exc.strerror}); choose another folder with "
                "--set output.dir=..."
            ) from None
        fd = safefs.open_regular(self.path / ".lock", os.O_RDWR | os.O_CREAT)
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
        for folder in (self.path, self.parts):  # temporary files a killed run left behind (ours: we hold the lock)
            for name in os.listdir(folder):
                if _TEMP_RE.match(name):
                    os.unlink(folder / name)

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

    def stored_identity(self) -> dict[str, Any] | None:
        """The job's identity as its store recorded it (the authority: a manifest can be lost or stale)."""
        if not Path(self.store_path).exists():
            return None
        try:
            store = Store(self.store_path, readonly=True)
        except sqlite3.Error:
            return None
        try:
            raw = store.get_meta(IDENTITY_META)
        except sqlite3.Error:  # an empty or foreign file: nothing recorded
            raw = None
        finally:
            store.close()
        return orjson.loads(raw) if raw else None

    def identity(self) -> dict[str, Any] | None:
        return self.stored_identity() or self.read_manifest()

    def adopt_batch_size(self, cfg: Config) -> None:
        """Read-only, before the input is scanned: a job keeps the batch size it started with, so unchanged
        batches keep their boundaries, digests and parts."""
        known = self.identity()
        if known is not None and "batch_size" in known and not _job_changes(
                known, cfg.request_fingerprint(), cfg.request_config()):
            cfg.input.batch_size = int(known["batch_size"])

    def check_job(self, cfg: Config, *, force_new: bool, config_path: str,
                  command: str | None = None) -> dict[str, Any]:
        """Refuse to mix two jobs in one folder, naming what changed; returns the manifest to use.

        Only what shapes requests identifies a job (config.request_config): the input is data, and limits,
        budgets, carried columns or the folder's place may change freely. The identity is read from the
        store first, then from manifest.json, so losing either never lets a changed job in. `command` is
        how the user ran this job (to show the --force-new variant of it)."""
        fingerprint, request = cfg.request_fingerprint(), cfg.request_config()
        has_answers = Path(self.store_path).exists() or bool(done_parts(self.parts))
        stored, current = self.stored_identity(), self.read_manifest()
        if current is None and stored is not None:  # lost: rebuilt from the store, whatever happens next
            self.write_manifest({"version": MANIFEST_VERSION, **stored, "rebuilt": time.time()})
        known = stored or current
        keys = _job_changes(known, fingerprint, request) if known is not None and has_answers else []
        if keys:
            what = ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
            if keys == ["?"]:
                what = "the request-affecting config (endpoint, model, prompt, params, structured)"
            if not force_new:
                raise JobChangedError(
                    f"{self.path} holds answers to a different job: {what} changed since it started, so its "
                    f"answers do not fit these requests. Use a new output.dir, or re-run with --force-new to "
                    f"move the old job aside (nothing is deleted): "
                    f"{command or 'pipeline run ' + config_path} --force-new")
            self._move_aside()
            known = None
        if not has_answers:
            known = None
        manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": fingerprint,
            "batch_size": cfg.input.batch_size,  # as adopt_batch_size left it, before the scan
            "model": cfg.endpoint.model,
            "name": cfg.job.name,  # job.name: how status, the webhook and the metrics call it (not its identity)
            "config": config_path,
            "request": request,
            # Where the rows come from (not the job's identity: the input is data), so `pipeline show` can
            # render a row's request again when the config file changed or is gone. Credentials stay out.
            "input": cfg.input.model_dump(exclude={"storage_options", "limit"}),
            "created": known.get("created", time.time()) if known else time.time(),
            "updated": time.time(),
        }
        if command:
            manifest["command"] = command  # what `pipeline status` shows as the way to resume
        self.write_manifest(manifest)
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        # Scrubbed as a whole: `pipeline status` shows it from another process, which knows no secrets.
        safefs.write_atomic(self.manifest_path, redact.scrub_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2)))

    def bind_store(self, store: Store, manifest: dict[str, Any]) -> None:
        """Record the job's identity in its store, where it survives a lost manifest."""
        keep = {k: manifest[k] for k in ("fingerprint", "request", "batch_size", "model", "created", "input")
                if k in manifest}
        value = orjson.dumps(keep, option=orjson.OPT_SORT_KEYS).decode()
        if store.get_meta(IDENTITY_META) != value:
            store.set_meta(IDENTITY_META, value)

    def record_input(self, manifest: dict[str, Any], rows: int, names: list[str]) -> None:
        """This run's input: its row count and the part that holds each batch, in order (for status)."""
        manifest.update(rows_total=rows, batches=names, updated=time.time())
        self.write_manifest(manifest)

    # -- parts: one per batch content ------------------------------------------------------------

    def reusable(self, store: Store, names: list[str], *, retry_failed: bool) -> tuple[set[str], PartCounts]:
        """The parts of this run's batches that can be used as they are, and the rows they hold.

        A part is named after its batch's content (part_names), so a complete part of the same name holds
        exactly this batch's rows and outcomes: no reading, rendering or store look-ups needed. It is
        redone when it holds rows a run must ask again: rows whose retries ran out on transient errors
        (always: a later run may get through), and with --retry-failed every row whose request failed.
        Counts come from the store's part index; a part whose index row a kill prevented is counted
        from its files, once. parts/ may be shared: a part whose footer cannot be read is named in a
        warning and not reused, so its batch is rebuilt from the store (nothing asked again) and the new
        part replaces it."""
        wanted = set(names)
        on_disk = {name for name in done_parts(self.parts) if name in wanted and self._intact(name)}
        index = store.parts()
        reuse: set[str] = set()
        ok = failed = request_failed = 0
        for name in names:
            if name not in on_disk:
                continue
            c = index.get(part_number(name))
            if c is None:
                c = count_part(self.parts, name)
                store.put_part(part_number(name), **asdict(c))
            if c.failed_transient or (retry_failed and c.request_failed):
                continue
            reuse.add(name)
            ok, failed, request_failed = ok + c.ok, failed + c.failed, request_failed + c.request_failed
        return reuse, PartCounts(ok, failed, 0, request_failed)

    def _intact(self, name: str) -> bool:
        """The part's files open as Parquet (one footer read each; a damaged page deeper in is still named
        by read_part when the outputs are merged)."""
        for kind in ("r", "f"):
            path = self.parts / f"{name}.{kind}.parquet"
            fh = safefs.open_read(path)
            if fh is None:  # no failures part is fine; a link or anything else there means: rebuild it
                if kind == "r" or os.path.lexists(path):
                    return False
                continue
            with fh:
                try:
                    pq.read_metadata(fh)
                except (pa.ArrowException, OSError) as exc:
                    log.warning("the part file %s is damaged (%s); its batch is rebuilt from the answers in "
                                "store.sqlite, nothing is asked again", path, exc)
                    return False
        return True

    def prune(self, store: Store, names: list[str]) -> None:
        """Drop the parts of batches this input no longer has (their answers stay in the store)."""
        keep = set(names)
        for entry in os.listdir(self.parts) if self.parts.is_dir() else ():
            m = ANY_PART_RE.match(entry)
            if m and m.group(1) not in keep:
                os.unlink(self.parts / entry)
        store.forget_parts(set(store.parts()) - {part_number(n) for n in keep})

    def _move_aside(self) -> None:
        aside = self.path / f"{layout.PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()  # fails on anything already there, a planted link included
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "parts", "manifest.json",
                     "results.parquet", "failures.parquet", "summary.json"):
            src = self.path / name
            if src.exists():
                os.replace(src, aside / name)
        safefs.ensure_dir(self.parts)


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


def resume_command(config_path: str | None, overrides: list[str] | None, *, retry_failed: bool,
                   out_dir: str | None = None) -> str:
    """The command that continues this job: the config path as given plus every --set, shell-quoted.
    From a notebook (a dict config) it names the output folder, which a notebook user may not have set."""
    if not config_path or config_path == "<dict>":
        call, flag = ("pipeline.run(..., retry_failed=True)", " --retry-failed") if retry_failed \
            else ("pipeline.run(...)", "")
        where = f" with output.dir {out_dir}" if out_dir else ""
        return f"the same {call} call{where} (or `pipeline run CONFIG{flag}` with this job's config file)"
    argv = ["pipeline", "run", config_path]
    for item in overrides or ():
        # A secret given with --set (a webhook URL, a storage key) is masked: the command is written to
        # manifest.json, summary.json and stderr. `--set 'KEY=!env NAME'` keeps the command runnable.
        argv += ["--set", redact.scrub(item)]
    if retry_failed:
        argv.append("--retry-failed")
    return shlex.join(argv)


def count_part(parts: Path, name: str) -> PartCounts:
    """A finished batch's counts read from its part files (footer, and the failures' error_class)."""
    ok = read_part(parts / f"{name}.r.parquet", pq.read_metadata).num_rows
    f = parts / f"{name}.f.parquet"
    if not f.exists():
        return PartCounts(ok, 0, 0, 0)
    classes = read_part(f, pq.read_table, columns=["error_class"]).column("error_class")
    transient = pc.sum(pc.equal(classes, "transient")).as_py() or 0
    from_input = pc.sum(pc.equal(classes, "input")).as_py() or 0
    return PartCounts(ok, len(classes), transient, len(classes) - from_input)


_MISSING = object()


def _job_changes(known: dict[str, Any], fingerprint: str, request: dict[str, Any]) -> list[str]:
    """The keys that make `request` another job than `known`; ["?"] when a difference cannot be named.

    Sections a recorded request has and today's identity does not (manifest v1 kept `input`, which is
    data now) are not compared: upgrading a job folder never makes it a different job."""
    if known.get("fingerprint") == fingerprint:
        return []
    if not isinstance(known.get("request"), dict):
        return ["?"]
    old = {k: v for k, v in known["request"].items() if k in request}
    for section, key in NOT_IDENTITY:
        if isinstance(old.get(section), dict):
            old[section] = {k: v for k, v in old[section].items() if k != key}
    return _changed_keys(old, request)


def _changed_keys(old: Any, new: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted keys whose values differ, two levels deep at most (`prompt.user`, `structured.schema`)."""
    if isinstance(old, dict) and isinstance(new, dict) and depth < 2:
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.", depth + 1)
        return out
    return [] if old == new else [prefix.rstrip(".")]
