"""Operating a nightly job (issue 10 items 2-7): pipeline.log, history, alerts, metrics, progress lines,
--limit, --version, status by config path.

The webhook receiver is a real aiohttp server on 127.0.0.1 (in a thread, since pipeline.run runs its
own loop); the metrics file is parsed with prometheus_client's own parser.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from pipeline import cli
from pipeline.core.progress import Live, Progress
from pipeline.ops import history, notify
from pipeline.ops.logfile import JsonLinesHandler, LogFile
from pipeline.send.dispatch import Stats
from tests.conftest import job
from tests.support import cli as run_cli
from tests.support import write_config


class Receiver:
    """A webhook receiver on loopback: answers the first `fail` POSTs with 503, then 200."""

    def __init__(self, fail: int = 0) -> None:
        self.fail, self.bodies = fail, []  # type: list[bytes]
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response(status=503 if len(self.bodies) <= self.fail else 200)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Receiver:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "RETRY_BASE_S", 0.01)


def test_a_failed_run_posts_its_record_to_the_webhook_with_retries_and_never_the_key(
        tmp_path: Path, fast_retries: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_TEST_KEY", "sk-nightly-secret-0123456789")
    (tmp_path / "a").mkdir()
    with Receiver(fail=1) as hook:
        ok = pipeline.run(job(tmp_path / "a", 5, endpoint={"api_key_env": "OPS_TEST_KEY"},
                              notify={"webhook": hook.url}))
        assert ok.exit_code == 0 and hook.bodies == []  # notify.on defaults to [failure]
        cfg = job(tmp_path, 6, sim={"fault_plan": [{"requests": "2", "fault": "422"}]},
                  endpoint={"api_key_env": "OPS_TEST_KEY"}, limits={"max_concurrency": 1},
                  notify={"webhook": hook.url, "retries": 2})
        s = pipeline.run(cfg)
    assert s.exit_code == 1 and len(hook.bodies) == 2  # a 503, then taken
    assert all(b"sk-nightly-secret" not in b for b in hook.bodies)
    got = orjson.loads(hook.bodies[-1])
    assert (got["outcome"], got["exit_code"], got["run_id"], got["failed"], got["requests"]) == (
        "failure", 1, s.run_id, 1, 6)
    assert got == {**got, **history.read(tmp_path / "out")[-1]}  # the run record, as in history.jsonl


def test_an_unreachable_webhook_never_changes_the_exit_code(tmp_path: Path, fast_retries: None) -> None:
    cfg = job(tmp_path, 3, notify={"webhook": "http://127.0.0.1:9/hook", "on": ["success"], "retries": 1,
                                   "timeout_s": 2})
    assert pipeline.run(cfg).exit_code == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    assert [e["event"] for e in log if e["event"] == "notify_failed"] == ["notify_failed"]


def test_the_metrics_file_parses_with_prometheus_clients_own_parser(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "pipeline.prom"
    prom.parent.mkdir()
    s = pipeline.run(job(tmp_path, 12, sim={"fault_plan": [{"requests": "3", "fault": "429"}]},
                         limits={"max_concurrency": 1}, output={"metrics_file": str(prom)}))
    assert s.exit_code == 0
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(prom.read_text()) for x in fam.samples}
    job_label = ("job", str(tmp_path / "out"))

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({**dict([job_label]), **labels}.items())))]

    assert value("pipeline_rows", state="succeeded") == 12 and value("pipeline_rows", state="pending") == 0
    assert value("pipeline_requests_total", status_class="2xx") == 12
    assert value("pipeline_requests_total", status_class="4xx") == 1
    assert value("pipeline_rate_limited_total") == 1
    assert value("pipeline_tokens_total", kind="prompt") == s.prompt_tokens
    assert value("pipeline_cost_usd_total") == pytest.approx(s.run_cost_usd)
    assert value("pipeline_run_exit_code") == 0 and value("pipeline_run_running") == 0
    assert value("pipeline_last_success_timestamp_seconds") > 0
    assert not list(prom.parent.glob("*.pipeline.prom*")) and len(list(prom.parent.iterdir())) == 1


def test_pipeline_log_writes_any_event_as_json_lines_and_rotates(tmp_path: Path) -> None:
    logfile = LogFile(tmp_path)
    try:
        logging.getLogger("pipeline").info(
            "attempt %d failed", 2, extra={"event": "attempt_failed", "key": "ab12", "attempt": 2, "status": 503,
                                            "error_class": "transient", "retry_in_s": 0.5})
    finally:
        logfile.close()
    [line] = (tmp_path / "pipeline.log").read_text().splitlines()
    got = json.loads(line)
    assert got["ts"].endswith("Z") and got["level"] == "INFO" and got["msg"] == "attempt 2 failed"
    assert {k: got[k] for k in ("event", "key", "attempt", "status", "error_class", "retry_in_s")} == {
        "event": "attempt_failed", "key": "ab12", "attempt": 2, "status": 503, "error_class": "transient",
        "retry_in_s": 0.5}
    handler = JsonLinesHandler(tmp_path / "small.log", max_bytes=300, backups=2)
    rec = logging.LogRecord("pipeline", logging.INFO, __file__, 1, "x" * 100, (), None)
    for _ in range(20):
        handler.emit(rec)
    handler.close()
    assert sorted(p.name for p in tmp_path.glob("small.log*")) == ["small.log", "small.log.1", "small.log.2"]


def test_links_planted_at_history_and_log_are_never_followed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("history.jsonl", "pipeline.log"):
        (out / name).symlink_to(victim)
    assert pipeline.run(job(tmp_path, 3)).exit_code == 0
    assert victim.read_text() == "precious"


def test_a_plain_status_line_when_stderr_is_not_a_terminal_and_final_figures_equal_the_summary() -> None:
    stream = io.StringIO()
    live = Live(in_flight=3, paused_s=12.4, last_error="429")
    p = Progress(100, 10, enabled=True, interval_s=1e-9, live=lambda: live, stream=stream)
    p.advance(5, Stats(), 0)
    p.tick()
    first = stream.getvalue()
    assert "\r" not in first and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ labelling: 15/100 rows \(15%\)", first)
    assert "inflight=3" in first and "429-pause 12s" in first and "last=429" in first
    stats = Stats(cost_usd=0.1234, prompt_tokens=10, completion_tokens=5)
    p.finish(99, 2, stats)
    last = stream.getvalue().splitlines()[-1]
    assert "99/100 rows" in last and "$0.1234" in last and "failed=2" in last and "tok=15" in last


def test_limit_verbose_version_and_status_by_config_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, job(tmp_path, 20))
    done = run_cli("run", str(path), "--limit", "5", "-v")
    assert done.returncode == 0, done.stderr
    assert "run_start: run" in done.stderr and "run_end: run" in done.stderr  # pipeline.log mirrored, human form
    assert "rows 5 new, 0 edited, 0 retried, 0 reused, 0 input-failed, 0 removed" in done.stderr
    assert pl.read_parquet(tmp_path / "out" / "results.parquet").height == 5
    assert cli.main(["status", str(path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["rows_total"], st["rows_done"], st["last_runs"][-1]["rows_new"]) == (5, 5, 5)
    with pytest.raises(SystemExit) as done_version:
        cli.main(["--version"])
    assert done_version.value.code == 0 and capsys.readouterr().out.strip() == f"pipeline {pipeline.__version__}"




def test_a_dataframe_or_arrow_table_is_input_and_a_grown_one_sends_only_its_new_rows(tmp_path: Path) -> None:
    import pyarrow as pa

    cfg = job(tmp_path, 1)
    del cfg["input"]["path"]
    frame = pl.DataFrame({"rid": [f"r{i}" for i in range(8)], "text": [f"t{i}" for i in range(8)], "stars": [1] * 8})
    first = pipeline.run(cfg, input=frame)
    assert (first.exit_code, first.succeeded, first.requests_sent) == (0, 8, 8)
    again = pipeline.run(cfg, input=frame.to_pandas())  # the same rows from pandas: nothing to ask
    assert (again.succeeded, again.requests_sent) == (8, 0)
    old = frame.to_arrow()
    grown = pa.concat_tables([old, pa.table({"rid": ["r8"], "text": ["t8"], "stars": [2]}).cast(old.schema)])
    third = pipeline.run(cfg, input=grown)
    assert (third.succeeded, third.requests_sent, third.rows_reused) == (9, 1, 8)


def test_the_resume_hint_from_a_notebook_names_the_output_folder(tmp_path: Path) -> None:
    cfg = job(tmp_path, 12, sim={"fault_plan": [{"requests": "4-", "fault": "401"}]}, limits={"max_concurrency": 1})
    s = pipeline.run(cfg)
    assert s.exit_code == 3 and s.next_step and str(tmp_path / "out") in s.next_step


def test_an_unreachable_endpoint_is_named_in_the_summary_history_and_log(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPS_TEST_KEY", "sk-test")
    cfg = job(tmp_path, 10, endpoint={"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "OPS_TEST_KEY"})
    cfg["endpoint"].pop("simulator")
    s = pipeline.run(cfg)
    host = f"127.0.0.1:{port}"
    assert s.exit_code == 3 and host in (s.stop_message or "")
    run = history.read(tmp_path / "out")[-1]
    assert (run["exit_code"], run["stop_reason"]) == (3, "fatal") and host in run["message"]
    events = [json.loads(line) for line in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "stop"] == ["fatal"]
    assert events[-1]["event"] == "run_end" and events[-1]["exit_code"] == 3


def test_the_metrics_file_is_written_during_the_run_not_only_at_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ops import invocation

    monkeypatch.setattr(invocation, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(invocation, "METRICS_INTERVAL_S", 0.0)
    prom = tmp_path / "pipeline.prom"
    cfg = job(tmp_path, 6, sim={"latency_ms": 100}, limits={"max_concurrency": 1}, output={"metrics_file": str(prom)})
    seen: list[str] = []
    t = threading.Thread(target=pipeline.run, args=(cfg,))
    t.start()
    while t.is_alive() and not seen:
        if prom.exists() and "pipeline_run_running" in (text := prom.read_text()):
            seen.append(text)
        time.sleep(0.01)
    t.join(60)
    assert seen, "no metrics file while the run was going"
    running = {x.name: x.value for fam in text_string_to_metric_families(seen[0]) for x in fam.samples}
    assert running["pipeline_run_running"] == 1 and "pipeline_run_exit_code" not in running


def test_an_internal_error_leaves_its_traceback_in_the_log_and_exit_70_in_the_history(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.engines.runner import run_async

    class Broken:  # a transport with a bug in it: not an outcome, a crash
        async def send(self, payload: bytes, *, stream: bool = False) -> Any:
            raise ZeroDivisionError("a bug")

        async def close(self) -> None:
            pass

    cfg = load_config(job(tmp_path, 3))
    with pytest.raises(ZeroDivisionError):
        asyncio.run(run_async(cfg, transport=Broken()))
    run = history.read(tmp_path / "out")[-1]
    assert (run["exit_code"], run["stop_reason"]) == (70, "error")
    events = [json.loads(line) for line in (tmp_path / "out" / "pipeline.log").read_text().splitlines()]
    [crash] = [e for e in events if e["event"] == "internal_error"]
    assert "ZeroDivisionError: a bug" in crash["traceback"] and events[-1]["event"] == "run_end"


def test_a_run_refused_by_the_lock_is_in_the_history_but_leaves_the_metrics_of_the_run_holding_it(
        tmp_path: Path) -> None:
    from pipeline.errors import StoreLockedError
    from pipeline.state.jobdir import JobDir

    prom = tmp_path / "pipeline.prom"
    cfg = job(tmp_path, 3, output={"metrics_file": str(prom)})
    holder = JobDir(cfg["output"]["dir"])
    holder.lock()  # as a running `pipeline run` holds it
    try:
        with pytest.raises(StoreLockedError):
            pipeline.run(cfg)
    finally:
        holder.unlock()
    run = history.read(tmp_path / "out")[-1]
    assert (run["exit_code"], run["stop_reason"]) == (2, "refused") and "in use by another run" in run["message"]
    assert not prom.exists() and not (tmp_path / "out" / "pipeline.log").exists()
