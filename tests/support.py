"""Helpers shared by the test files: run the CLI (in this process or a child), read a job's outputs.

`cli_in_process` is the default way to run the CLI in a test: `pipeline.cli.main` with the streams,
environment, working directory, logging and signal handlers a fresh process would have, all put back
afterwards, so a case costs what the run costs instead of ~2 s of imports. `cli` and `start` run the
real `python -m pipeline` in a child process, for what needs one: signals, kill -9, locks held by
another process, and a few smoke tests of the entry point itself. A simulator on its own thread
(`SimulatorThread`) outlives the runs it answers: `served_by_key` says what it was paid for.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from pipeline_simulator.thread import SimulatorThread
from tests.conftest import REPO, job

# Every CLI run a test starts gets this variable holding a fake key; `sim_job` configs name it.
TEST_KEY_ENV = "PIPELINE_TEST_KEY"

Env = Mapping[str, str | None]


def outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """results.parquet and failures.parquet of a job folder; an empty frame for a file not written."""
    def read(name: str) -> pl.DataFrame:
        return pl.read_parquet(out / name) if (out / name).exists() else pl.DataFrame()
    return read("results.parquet"), read("failures.parquet")


def assert_each_id_once(out: Path, n: int, id_column: str = "rid") -> pl.DataFrame:
    """Every one of the n input ids is in results or failures, and none twice; returns the results."""
    res, fail = outputs(out)
    ids = [*(res[id_column].to_list() if res.height else []), *(fail[id_column].to_list() if fail.height else [])]
    assert len(ids) == n, f"{len(ids)} rows in the outputs, {n} in the input"
    assert len(set(ids)) == n, f"{len(ids) - len(set(ids))} ids twice"
    return res


def child_env(env: Env | None = None) -> dict[str, str]:
    """The environment a CLI run gets: ours without API keys (a developer's real key never reaches a
    test) but with the fake TEST_KEY_ENV, this checkout first on PYTHONPATH, then `env` (a None value
    unsets a variable)."""
    out = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    out[TEST_KEY_ENV] = "sk-test"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    for name, value in (env or {}).items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def cli(*argv: str, env: Env | None = None, cwd: Path | str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGV` in a child process; returns its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, check=False,
                          timeout=timeout, env=child_env(env), cwd=cwd or REPO)


def start(*argv: str, env: Env | None = None, cwd: Path | str | None = None) -> subprocess.Popen[str]:
    """`python -m pipeline ARGV` running in the background; end it with `finish` or `kill`."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(env), cwd=cwd or REPO)


def kill(proc: subprocess.Popen[str]) -> None:
    """kill -9, reap, and close the pipes (an unread pipe left open is a ResourceWarning)."""
    proc.kill()
    proc.communicate()


def cli_in_process(*argv: str, env: Env | None = None,
                   cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """`pipeline.cli.main(ARGV)` in this process, as `cli` would run it in a child process."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _fresh_process_state(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1 if exc.code else 0
    return subprocess.CompletedProcess(["pipeline", *argv], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _fresh_process_state(env: Env | None, cwd: Path | str | None) -> Iterator[None]:
    """Environment, working directory, logging configuration and signal handlers as a new process has
    them (the CLI configures logging and installs signal handlers), restored afterwards."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root, ours = logging.getLogger(), logging.getLogger("pipeline")
    saved_root = (root.handlers[:], root.level)
    saved_ours = (ours.handlers[:], ours.level, ours.propagate)
    os.environ.clear()
    os.environ.update(child_env(env))
    root.handlers = []  # so the CLI's logging.basicConfig writes to this run's stderr, as in a new process
    try:
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for logger, handlers in ((root, saved_root[0]), (ours, saved_ours[0])):
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers = handlers
        root.setLevel(saved_root[1])
        ours.setLevel(saved_ours[1])
        ours.propagate = saved_ours[2]
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def offline_dns(asked: list[str] | None = None) -> Iterator[None]:
    """Host names resolve only if they are loopback, as on a machine without DNS: no lookup leaves it.
    Every name asked for is appended to `asked`."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if asked is not None:
            asked.append(name)
        if name is None or name == "localhost" or _is_ip(name):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    socket.getaddrinfo = resolve  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = real  # type: ignore[assignment]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def wait_for(pred: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll until `pred()` holds; the timeout only turns a hang into a failure, it measures nothing."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


# -- jobs answered by a SimulatorThread ----------------------------------------------------------------

def sim_job(tmp_path: Path, sim: SimulatorThread, rows: int, **sections: Any) -> dict[str, Any]:
    """conftest.job, answered by `sim` (running on its own thread) with the key in TEST_KEY_ENV."""
    cfg = job(tmp_path, rows, **sections)
    cfg["endpoint"] = {**cfg["endpoint"], "base_url": sim.base_url, "api_key_env": TEST_KEY_ENV}
    cfg["endpoint"].pop("simulator", None)
    return cfg


def write_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def served_by_key(sim: SimulatorThread) -> Counter[str]:
    """200s the simulator served, per request key (key = sha256(base_url + "\\n" + raw body))."""
    assert sim.base_url is not None
    prefix = sim.base_url.encode() + b"\n"
    raw_bodies = sim.call(lambda: [e.raw for e in sim.sim.service.acct.log if e.raw is not None])
    key_of = {hashlib.sha256(raw).hexdigest(): hashlib.sha256(prefix + raw).hexdigest() for raw in raw_bodies}
    served: dict[str, int] = sim.stats()["served_by_body"]
    missing = set(served) - set(key_of)
    assert not missing, f"{len(missing)} served bodies are not in the simulator's log (raise log_limit)"
    return Counter({key_of[digest]: n for digest, n in served.items()})


def store_query(out: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows `sql` selects from a job's store, opened read-only (a run may hold it)."""
    db = sqlite3.connect(f"file:{out / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def stored_ok_keys(out: Path) -> set[str]:
    """Request keys of the answers in a job's store."""
    return {k for (k,) in store_query(out, "SELECT key FROM responses WHERE state = 'ok'")}


def max_unstored_at_kill(max_concurrency: int) -> int:
    """How many answers a kill -9 can find served but not yet stored. A request holds its concurrency
    slot until its answer is committed, so at most `max_concurrency` received answers await a commit; but
    the server counts an answer when it writes it, and an attempt the client has already given up on
    (a reset or read timeout on a loaded machine) has freed its slot by then and waits in backoff. One
    more round of slots bounds those. All of them are re-sent by the resume; nothing else is."""
    return 2 * max_concurrency


class StderrLines:
    """A child's stderr, read on a thread as it comes, so a test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)

    def text(self) -> str:
        return "".join(list(self._lines))

    def finish(self, timeout: float = 120) -> str:
        """Wait for the child to exit (the timeout is a hang guard), close its pipes; all of stderr."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.text()
