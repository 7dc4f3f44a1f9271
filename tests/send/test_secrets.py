"""The API key is secret: it goes only to the configured endpoint and appears in nothing we produce.

A recognisable key runs through every mode (success, failures, a fatal 401, streaming, a dry run,
status, debug logging, exception paths) and everything produced is searched for it: every file in
output.dir (the SQLite store and its WAL included, as bytes), stdout, stderr, log records, exception
messages, and the simulator's own request log. Loopback servers prove where the key does NOT go: across
a redirect to another port, or to an image URL (images are never fetched). A socket watch proves the
run talks to nothing but the endpoint (no telemetry).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline
from pipeline.cli import main
from tests.conftest import job
from tests.support import cli, cli_in_process, start

KEY = "sk-or-v1-SECRET-canary-1234"
ENV = "OPENROUTER_API_KEY"
NEEDLES = [KEY.encode(), KEY[len("sk-or-v1-"):].encode(), b"canary-1234"]


def assert_clean(*blobs: bytes | str, where: str = "") -> None:
    for blob in blobs:
        data = blob.encode() if isinstance(blob, str) else blob
        for needle in NEEDLES:
            assert needle not in data, f"the key leaked into {where}"


def assert_dir_clean(path: Path) -> int:
    files = [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        assert_clean(p.read_bytes(), where=str(p))
    return len(files)


def write(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MODES: dict[str, dict[str, Any]] = {
    # The simulator demands exactly this key, so a pass proves it was sent to the endpoint.
    "success": {"sim": {"api_key": KEY}},
    "failures": {"sim": {"api_key": KEY, "fault_plan": [
        {"requests": "1-3", "fault": "500"}, {"requests": "4-30", "fault": "schema_invalid"},
        {"requests": "31", "fault": "404", "message": "no such model"}]}},
    "fatal 401": {"sim": {"api_key": "sk-or-v1-some-other-key"}},
    "stream": {"sim": {"api_key": KEY, "stream_comments_between": True}, "params": {"stream": True, "max_tokens": 200}},
    "402 credits": {"sim": {"api_key": KEY, "credits_usd": 0.004}},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_the_key_appears_in_nothing_a_run_produces(mode: str, tmp_path: Path) -> None:
    spec = MODES[mode]
    sections = {"params": spec["params"]} if "params" in spec else {}
    cfg = job(tmp_path, 12, sim=spec["sim"], **sections)
    cfg["endpoint"]["api_key_env"] = ENV
    path = write(tmp_path, cfg)
    run = cli("run", str(path), "-v", cwd=tmp_path, env={ENV: KEY})  # a real process: all it prints
    assert run.returncode in (0, 1, 3), run.stderr
    if mode == "success":
        assert run.returncode == 0
    if mode == "fatal 401":
        assert run.returncode == 3 and "401" in run.stderr
    assert_clean(run.stdout, run.stderr, where="stdout/stderr")
    assert assert_dir_clean(tmp_path / "out") >= 4  # store.sqlite, manifest, parts, summary, outputs...
    for args in (("status", str(tmp_path / "out")), ("status", str(tmp_path / "out"), "--json")):
        st = cli_in_process(*args, cwd=tmp_path, env={ENV: KEY})
        assert st.returncode == 0, st.stderr
        assert_clean(st.stdout, st.stderr, where="status")


def test_dry_run_and_simulate_print_no_key(tmp_path: Path) -> None:
    cfg = job(tmp_path, 5, sim={"api_key": KEY}, limits={"requests_per_minute": 600})
    cfg["endpoint"]["api_key_env"] = ENV
    dry = cli_in_process("run", str(write(tmp_path, cfg)), "--dry-run", "-v", cwd=tmp_path, env={ENV: KEY})
    assert dry.returncode == 0, dry.stderr
    assert_clean(dry.stdout, dry.stderr, where="dry run")
    sim = start("simulate", "--port", "0", "--api-key-env", ENV, env={ENV: KEY})
    try:
        url = sim.stdout.readline() if sim.stdout else ""
        assert url.startswith("http://127.0.0.1:")
    finally:
        sim.terminate()
        out, err = sim.communicate(timeout=30)
    assert_clean(url, out, err, where="pipeline simulate")


def test_debug_logs_exceptions_and_the_simulator_log_hold_no_key(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.send import dispatch
    from pipeline_simulator import SimConfig, SimulatorThread

    monkeypatch.setenv(ENV, KEY)
    calls = [0]
    real_parse = dispatch.parse_completion

    def buggy(*a: Any, **k: Any) -> Any:  # a parser bug on one answer: the exception path logs a traceback
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("parser bug")
        return real_parse(*a, **k)

    monkeypatch.setattr(dispatch, "parse_completion", buggy)
    caplog.set_level(logging.DEBUG)  # every logger: ours, aiohttp's, asyncio's
    with SimulatorThread(SimConfig(api_key=KEY)) as url:
        cfg = job(tmp_path, 6, endpoint={"base_url": url, "api_key_env": ENV})
        code = main(["run", str(write(tmp_path, cfg)), "-v"])
        thread_log = json.dumps(_sim_log(url))  # what the simulator recorded of every request
    captured = capsys.readouterr()
    assert code == 1  # the answer whose parse failed is a failure row; the rest succeeded
    assert any("could not parse the answer" in r.getMessage() for r in caplog.records)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert_clean(text, caplog.text, captured.out, captured.err, thread_log, where="logs")
    assert '"Authorization": "present"' in thread_log  # the simulator saw a key and logged only that
    assert_dir_clean(tmp_path / "out")


def _sim_log(url: str) -> list[dict[str, Any]]:
    import urllib.request

    root = url.split("/api/v1")[0]
    with urllib.request.urlopen(f"{root}/_sim/requests") as resp:
        return json.loads(resp.read())


def test_error_messages_and_reprs_never_carry_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import load_config
    from pipeline.send.transport import HttpTransport

    monkeypatch.setenv(ENV, KEY)
    cfg = load_config(job(tmp_path, 1, endpoint={"api_key_env": ENV, "base_url": "http://127.0.0.1:9/v1"}))
    assert_clean(repr(cfg), str(cfg.model_dump()), cfg.model_dump_json(), where="config repr")
    t = HttpTransport("http://127.0.0.1:9/v1", cfg.api_key())
    assert_clean(repr(t), str(vars(t).get("base_url")), where="transport repr")
    s = pipeline.run(job(tmp_path, 3, endpoint={"api_key_env": ENV, "base_url": "http://127.0.0.1:9/v1"},
                         limits={"max_retries": 0, "backoff_base_s": 0.01}))
    assert s.exit_code == 3
    assert_clean(json.dumps(s.__dict__, default=str), where="summary")


# -- where the key goes ------------------------------------------------------------------------------

class Recorder:
    """A loopback HTTP server that records every request's path and headers, and answers as told."""

    def __init__(self, answer: Any) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                recorder.requests.append((self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, headers, body = answer(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_key_does_not_follow_a_redirect_to_another_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    with Recorder(lambda path: (200, {}, b"{}")) as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.port}/v1/chat/completions"
        with Recorder(lambda path: (307, {"Location": target}, b"")) as endpoint:
            s = pipeline.run(job(tmp_path, 5, endpoint={"base_url": f"http://127.0.0.1:{endpoint.port}/v1",
                                                        "api_key_env": ENV}))
    assert s.exit_code == 3 and "redirect (HTTP 307)" in (s.stop_message or "")
    assert "endpoint.base_url" in (s.stop_message or "")
    assert endpoint.requests and all(h.get("Authorization") == f"Bearer {KEY}" for _, h in endpoint.requests)
    assert elsewhere.requests == []  # never followed, so the other host saw nothing at all
    assert_clean(s.stop_message or "", where="stop message")


def test_image_urls_are_passed_on_never_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_simulator import SimConfig, SimulatorThread

    monkeypatch.setenv(ENV, KEY)
    with Recorder(lambda path: (200, {"Content-Type": "image/png"}, b"\x89PNG")) as images, \
            SimulatorThread(SimConfig(api_key=KEY)) as url:
        rows = tmp_path / "in.jsonl"
        rows.write_text("".join(json.dumps({"rid": f"r{i}", "text": "look", "stars": 1,
                                            "photo": f"http://127.0.0.1:{images.port}/img{i}.png"}) + "\n"
                                for i in range(4)))
        s = pipeline.run(job(tmp_path, endpoint={"base_url": url, "api_key_env": ENV}, prompt={"images": ["photo"]}))
        sent = _sim_log(url)
    assert (s.exit_code, s.succeeded) == (0, 4)
    assert images.requests == []
    assert all(f"127.0.0.1:{images.port}/img" in json.dumps(e["body"]) for e in sent)


@contextmanager
def watched_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every address this process connects to or resolves while the block runs."""
    seen: list[Any] = []
    real_connect, real_resolve = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        seen.append(("connect", address))
        return real_connect(self, address)

    def resolve(host: Any, *a: Any, **k: Any) -> Any:
        seen.append(("resolve", host))
        return real_resolve(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    yield seen


def test_no_telemetry_only_the_endpoint_is_contacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_simulator import SimConfig, SimulatorThread

    monkeypatch.setenv(ENV, KEY)
    with SimulatorThread(SimConfig(api_key=KEY)) as url:
        port = int(url.split(":")[2].split("/")[0])
        with watched_sockets(monkeypatch) as seen:
            s = pipeline.run(job(tmp_path, 10, endpoint={"base_url": url, "api_key_env": ENV}))
            pipeline.load(tmp_path / "out")
    assert s.exit_code == 0
    others = [(kind, a) for kind, a in seen if not (
        (kind == "resolve" and a in ("127.0.0.1", "localhost")) or
        (kind == "connect" and isinstance(a, tuple) and a[:2] == ("127.0.0.1", port)))]
    assert others == []
