"""A Ray run as the operator sees it: the local engine's invocation (ops/invocation.py: run id, history
record, metrics file, webhook) over an output location that may be an object-store prefix.

- `pipeline.log`: the driver's events and the workers' (each worker captures its `pipeline` logger's
  events as JSON lines, `LineCapture`, and hands them over with every shard's figures; the driver writes
  them into the same log). In a local folder it is the local engine's rotating file; on an object store
  (no appends) the driver keeps the log's bytes and writes the whole object again every FLUSH_S and at
  the end, rotating to pipeline.log.1 .. .3 past 10 MB, like the local file.
- `history.jsonl`: one line per invocation. In a local folder appended (O_APPEND); on an object store
  read, extended and written again by the lease holder only (a driver refused by the lease writes none
  there: it does not own the location).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import orjson

from ...common import redact
from ...config import Config
from ...ops import history, notify
from ...ops.invocation import Invocation
from ...ops.logfile import BACKUPS, LOG_FILE, MAX_BYTES, JsonFormatter
from ...read import storage

log = logging.getLogger("pipeline")
FLUSH_S = 5.0


class LineCapture(logging.Handler):
    """In a worker: the `pipeline` logger's events as JSON lines, until taken with `take()`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) >= 10_000:  # a flood between two shards: count it, keep memory bounded
            self.dropped += 1
            return
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never break a worker
            self.handleError(record)

    def take(self) -> str:
        lines, self.lines = self.lines, []
        if self.dropped:
            lines.append(orjson.dumps({"event": "log_dropped", "level": "WARNING", "count": self.dropped,
                                       "msg": f"{self.dropped} worker log lines dropped"}).decode())
            self.dropped = 0
        return "\n".join(lines)

    @classmethod
    def install(cls) -> LineCapture:
        logger = logging.getLogger("pipeline")
        for h in logger.handlers:
            if isinstance(h, cls):
                return h
        capture = cls()
        logger.addHandler(capture)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        return capture


class ObjectLog(logging.Handler):
    """pipeline.log as an object: the log's bytes kept here, the whole object written on flush."""

    def __init__(self, root: str, options: dict[str, Any] | None) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.root, self.options = root, options
        self.uri = storage.join(root, LOG_FILE)
        try:
            self.data = bytearray(storage.read_bytes(self.uri, options))
        except (FileNotFoundError, OSError):
            self.data = bytearray()
        self.dirty = False
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        with self._lock2:
            self.data += line.encode() + b"\n"
            self.dirty = True

    def flush(self) -> None:
        with self._lock2:
            if not self.dirty:
                return
            data, self.dirty = bytes(self.data), False
            if len(self.data) > MAX_BYTES:
                self._rotate(data)
                self.data = bytearray()
                data = b""
        try:
            storage.write_bytes(self.uri, data, self.options, root=self.root)
        except OSError as err:
            self.dirty = True
            logging.getLogger("pipeline.ops").warning("cannot write %s: %s", self.uri, err)

    def _rotate(self, data: bytes) -> None:
        for n in range(BACKUPS - 1, 0, -1):
            try:
                older = storage.read_bytes(f"{self.uri}.{n}", self.options)
            except (FileNotFoundError, OSError):
                continue
            storage.write_bytes(f"{self.uri}.{n + 1}", older, self.options, root=self.root)
        storage.write_bytes(f"{self.uri}.1", data, self.options, root=self.root)

    def close(self) -> None:
        self.flush()
        super().close()


class RayInvocation(Invocation):
    """Invocation whose output folder may be s3:// or gs://, with the workers' log lines merged in."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.root = cfg.output.dir
        self.remote = storage.is_remote(self.root)
        self.object_log: ObjectLog | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def attach_output(self) -> None:
        """The run holds the lease: open the log (local file or object) and say the run started."""
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)
            self.attach(Path(self.root))
            return
        self.owner = True
        self.object_log = ObjectLog(self.root, self.cfg.output.storage_options)
        logger = logging.getLogger("pipeline")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self.object_log)
        self._flusher = threading.Thread(target=self._flush_loop, name="pipeline-log", daemon=True)
        self._flusher.start()
        log.info("run %s started (pid %d)", self.run_id, os.getpid(),
                 extra={"event": "run_start", "run_id": self.run_id, "pid": os.getpid(), "config": self.cfg.source,
                        "engine": "ray"})

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            if self.object_log is not None:
                self.object_log.flush()

    def worker_lines(self, text: str) -> None:
        """Lines a worker logged (already JSON and scrubbed there; scrubbed again here)."""
        for line in text.splitlines():
            if not line.strip():
                continue
            line = redact.scrub(line)
            if self.object_log is not None:
                self.object_log.add(line)
            elif self.logfile is not None:
                handler = self.logfile.handler
                handler.acquire()
                try:
                    if handler.stream is None:
                        handler.stream = handler._open()
                    handler.stream.write(line + "\n")
                    handler.flush()
                finally:
                    handler.release()

    async def finish(self, summary: Any, exc: BaseException | None) -> history.RunRecord:
        record = await super().finish(summary, exc)
        if self.remote and self.owner:
            self._append_history(record)
        if self.object_log is not None:
            self._stop.set()
            logger = logging.getLogger("pipeline")
            logger.removeHandler(self.object_log)
            logger.setLevel(self._level)
            self.object_log.close()
            self.object_log = None
        return record

    def _append_history(self, record: history.RunRecord) -> None:
        uri = storage.join(self.root, history.HISTORY_FILE)
        opts = self.cfg.output.storage_options
        try:
            try:
                old = storage.read_bytes(uri, opts)
            except FileNotFoundError:
                old = b""
            line = redact.scrub_bytes(orjson.dumps(record.to_json())) + b"\n"
            if old and not old.endswith(b"\n"):
                old += b"\n"
            storage.write_bytes(uri, old + line, opts, root=self.root)
        except OSError as err:
            log.warning("could not append to %s: %s", uri, err)

    @property
    def job_name(self) -> str:
        return self.cfg.job.name or self.root  # the URI as given (a Path would fold s3:// into s3:/)

    async def _notify(self, record: history.RunRecord) -> None:
        n = self.cfg.notify
        outcome = "success" if record.exit_code == 0 else "failure"
        if n.webhook and outcome in n.on:
            payload = {"job": self.job_name, "out_dir": self.root, "outcome": outcome, "host": socket.gethostname(),
                       "engine": "ray", **record.to_json()}
            await notify.post(n.webhook, notify.shape(payload, n.format), timeout_s=n.timeout_s, retries=n.retries)


def read_history(root: str, options: dict[str, Any] | None, last: int | None = None) -> list[dict[str, Any]]:
    """history.jsonl of a local folder or an object-store prefix, oldest first; torn lines skipped."""
    if not storage.is_remote(root):
        return history.read(root, last)
    try:
        data = storage.read_bytes(storage.join(root, history.HISTORY_FILE), options)
    except (FileNotFoundError, OSError):
        return []
    return history.parse(data, last)
