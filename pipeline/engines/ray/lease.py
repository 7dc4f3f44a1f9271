"""One driver per Ray job: a lease on the output location, taken by conditional creation.

Object stores have no lock, but they create an object only if it does not exist yet when asked to
(`PUT` with `If-None-Match: *`: S3 answers 412 when the key is there; a local folder does the same with
O_CREAT|O_EXCL). The lease is a chain of such objects, `<output.dir>/_lease/<generation:012d>.json`, each
holding {holder, host, pid, run_id, expires_at}; the newest generation is the lease:

- acquire: the newest generation is live (not expired, not released) and not ours: refused (exit 2,
  naming the holder). Otherwise create the next generation; of two drivers racing for it, exactly one
  creation succeeds, the other is refused.
- renew (every LEASE_S / 3, from a thread): create the next generation again. Failing to means another
  driver took the lease after ours expired (this process stalled for longer than LEASE_S): this run
  must stop (`lost` is set and the caller halts dispatch).
- release: a last generation marked released, so the next driver is admitted at once; a driver that
  dies without releasing is succeeded once its lease expires (LEASE_S after its last renewal), or at
  once by a driver on the same machine that sees the holder's process is gone.

Generations older than the newest two are deleted as the chain grows. Time comes from an injected
clock (tests move it instead of sleeping); `expires_at` is wall-clock epoch seconds, so drivers on
different machines need clocks within a few seconds of each other (LEASE_S is far longer).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from ...errors import RunFatalError, StoreLockedError
from ...read import storage
from . import conditional

log = logging.getLogger("pipeline")

LEASE_DIR = "_lease"
LEASE_S = 60.0       # how long a lease lasts without renewal: a dead driver's successor waits at most this
RENEW_EVERY = 3      # renewals per LEASE_S


def _generation(uri: str) -> int | None:
    name = uri.rsplit("/", 1)[-1]
    if not name.endswith(".json"):
        return None
    try:
        return int(name[:-5])
    except ValueError:
        return None


class Lease:
    """The lease of one driver on one output location (local folder or s3://)."""

    def __init__(self, root: str, options: dict[str, Any] | None = None, *, run_id: str = "",
                 ttl_s: float = LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self.root, self.options, self.ttl_s, self.clock = root, options, ttl_s, clock
        self.folder = storage.join(root, LEASE_DIR)
        self.me = {"holder": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                   "run_id": run_id}
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the chain -------------------------------------------------------------------------------

    def _chain(self) -> list[tuple[int, str]]:
        found = [(g, uri) for uri in storage.list_files(self.folder, self.options)
                 if (g := _generation(uri)) is not None]
        return sorted(found)

    def newest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest generation and what it holds (None: no lease was ever taken here)."""
        for gen, uri in reversed(self._chain()):
            try:
                return gen, orjson.loads(storage.read_bytes(uri, self.options))
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue  # deleted meanwhile, or written by hand: the one below decides
        return None

    def _create(self, gen: int, released: bool = False) -> bool:
        body = {**self.me, "generation": gen, "taken_at": self.clock(),
                "expires_at": 0.0 if released else self.clock() + self.ttl_s, "released": released}
        uri = storage.join(self.folder, f"{gen:012d}.json")
        return conditional.create(uri, orjson.dumps(body), self.options, root=self.root)

    def _trim(self, keep_from: int) -> None:
        for gen, uri in self._chain():
            if gen < keep_from - 1:
                try:
                    conditional.delete(uri, self.options)
                except OSError:
                    pass  # only tidiness: an old generation never decides anything

    # -- the driver's side ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise StoreLockedError (exit 2) naming the driver that holds it."""
        try:
            self._acquire()
        except OSError as exc:  # the store refused or is unreachable: nothing was sent, nothing written
            raise RunFatalError(f"cannot take the driver lease on {self.root}: {exc}",
                                hint="check the credentials and that the object store honours If-None-Match, "
                                     "then re-run the same command") from exc

    def _acquire(self) -> None:
        newest = self.newest()
        gen = 0
        if newest is not None:
            gen, held = newest
            if not held.get("released") and float(held.get("expires_at", 0)) > self.clock() \
                    and held.get("holder") != self.me["holder"] and not self._died_here(held):
                raise StoreLockedError(self._refusal(held))
        if not self._create(gen + 1):
            taken = self.newest()
            raise StoreLockedError(self._refusal(taken[1] if taken else {}))
        self.generation = gen + 1
        self._trim(gen + 1)

    def _died_here(self, held: dict[str, Any]) -> bool:
        """A holder on this machine whose process is gone (a driver killed with kill -9): its lease is void
        now, not when it expires, so the same command can resume at once (as the local engine's lock)."""
        pid = held.get("pid")
        if held.get("host") != self.me["host"] or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def _refusal(self, held: dict[str, Any]) -> str:
        until = float(held.get("expires_at", 0) or 0)
        left = max(0, round(until - self.clock()))
        return (f"{self.root} is in use by another driver (pid {held.get('pid')} on {held.get('host')}, run "
                f"{held.get('run_id') or '?'}, lease {held.get('holder')}); wait for it to finish or stop it. "
                f"A driver that died releases it when its lease expires (in {left} s at most), then the same "
                "command runs")

    def renew(self) -> bool:
        """Extend the lease by one generation; False (and `lost` set) when another driver took it."""
        if self.generation is None or self.lost:
            return False
        nxt = self.generation + 1
        if self._create(nxt):
            self.generation = nxt
            self._trim(nxt)
            return True
        taken = self.newest()
        self.lost = self._refusal(taken[1] if taken else {}).replace("is in use by", "was taken over by")
        log.error("lease lost: %s", self.lost, extra={"event": "lease_lost"})
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.generation is not None and not self.lost:
            try:
                if self._create(self.generation + 1, released=True):
                    self._trim(self.generation + 1)
            except OSError as exc:  # the lease then expires on its own
                log.warning("could not release the driver lease on %s: %s", self.root, exc)
        self.generation = None

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew from a daemon thread until released; call `on_lost(message)` if the lease is lost."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / RENEW_EVERY):
                try:
                    ok = self.renew()
                except OSError as exc:  # a storage hiccup: try again at the next beat, the lease still holds
                    log.warning("could not renew the driver lease: %s", exc)
                    continue
                if not ok:
                    on_lost(self.lost or "lease lost")
                    return
        self._thread = threading.Thread(target=loop, name="pipeline-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self.lost:
            raise RunFatalError(self.lost, hint="make sure one driver runs this job, then re-run the same command")
