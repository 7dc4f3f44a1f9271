"""`pipeline check CONFIG` (issue 19 item 12): the key, the endpoint, its Batch API and every place the run
writes are checked before anything is paid for, against real servers on 127.0.0.1 (the simulator, a
small server without a Batch API, a closed port, moto's S3)."""
from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from pipeline.ops.check import print_checks, run_checks
from pipeline.read import storage
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job
from tests.support import cli_in_process, sim_job, write_config


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    thread = SimulatorThread(SimConfig(api_key="sk-test"))  # the key the CLI gets in tests
    thread.start()
    yield thread
    thread.stop()


def _check(cfg: dict, tmp_path: Path, *extra: str, env: dict[str, str | None] | None = None) -> tuple[int, dict]:
    path = write_config(tmp_path, cfg)
    done = cli_in_process("check", str(path), "--json", *extra, env=env)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_a_ready_job_passes_every_check_without_a_chat_request(tmp_path: Path, sim: SimulatorThread) -> None:
    cfg = sim_job(tmp_path, sim, 3, output={"metrics_file": str(tmp_path / "metrics" / "job.prom")})
    code, report = _check(cfg, tmp_path)
    assert code == 0, report
    checks = _by_name(report)
    assert set(checks) == {"config", "key", "endpoint", "output.dir", "output.metrics_file"}
    assert all(c["ok"] for c in checks.values())
    assert "GET " in checks["endpoint"]["detail"] and "/key" in checks["endpoint"]["detail"]
    stats = sim.stats()
    assert stats["requests"] == 0 and stats["cost_usd"] == 0 and stats["other_requests"] == 1  # nothing billable
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics").exists()  # probes leave nothing
    plain = cli_in_process("check", str(write_config(tmp_path, cfg)))
    assert plain.returncode == 0 and "ready to run" in plain.stdout


def test_a_refused_key_a_missing_key_and_an_unreachable_endpoint(tmp_path: Path, sim: SimulatorThread) -> None:
    cfg = sim_job(tmp_path, sim, 3)
    code, report = _check(cfg, tmp_path, env={"PIPELINE_TEST_KEY": "sk-wrong"})
    assert code == 2 and "refused" in _by_name(report)["endpoint"]["detail"]
    code, report = _check(cfg, tmp_path, env={"PIPELINE_TEST_KEY": None})
    assert code == 2 and not _by_name(report)["key"]["ok"] and "PIPELINE_TEST_KEY" in _by_name(report)["key"]["detail"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg["endpoint"]["base_url"] = f"http://127.0.0.1:{port}/v1"
    code, report = _check(cfg, tmp_path)
    assert code == 3 and "cannot connect" in _by_name(report)["endpoint"]["detail"]


class NoBatchServer:
    """`GET /v1/models` answers (or fails as told); there is no `/v1/batches` (as on most gateways)."""

    def __init__(self, status: int = 200, message: str = "") -> None:
        self.status, self.message = status, message
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def _models(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.json_response({"error": {"message": self.message}}, status=self.status)
        return web.json_response({"data": [{"id": "openai/gpt-4-turbo"}]})

    def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        self.runner = runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> NoBatchServer:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_batch_mode_needs_a_batch_api(tmp_path: Path, sim: SimulatorThread) -> None:
    cfg = sim_job(tmp_path, sim, 3, run={"mode": "batch"})
    code, report = _check(cfg, tmp_path)
    assert code == 0 and _by_name(report)["batch api"]["ok"], report
    with NoBatchServer() as server:
        cfg["endpoint"]["base_url"] = server.url
        code, report = _check(cfg, tmp_path)
    checks = _by_name(report)
    assert checks["endpoint"]["ok"] and "1 models listed" in checks["endpoint"]["detail"]
    assert code == 2 and not checks["batch api"]["ok"] and "run.mode: sync" in checks["batch api"]["detail"]


def test_unwritable_publish_bucket_and_metrics_folder_are_found_before_the_run(
        tmp_path: Path, s3_bucket: str) -> None:
    # In this process: the S3 endpoint on loopback is in this process's environment (AWS_ENDPOINT_URL).
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = job(tmp_path, 3, output={"publish": "s3://no-such-bucket-here/labelled/",
                                   "metrics_file": str(blocker / "job.prom")})
    checks = {c.name: c for c in run_checks(str(write_config(tmp_path, cfg)))}
    assert not checks["output.publish"].ok and "no-such-bucket-here" in checks["output.publish"].detail
    assert not checks["output.metrics_file"].ok and "a-file" in checks["output.metrics_file"].detail
    assert print_checks(list(checks.values()), io.StringIO()) == 2
    cfg["output"] = {**cfg["output"], "publish": f"{s3_bucket}/labelled/", "metrics_file": str(tmp_path / "m.prom")}
    checks = {c.name: c for c in run_checks(str(write_config(tmp_path, cfg)))}
    assert all(c.ok for c in checks.values()), [c.detail for c in checks.values() if not c.ok]
    assert storage.list_files(s3_bucket) == []  # the probe was removed


def test_server_text_in_a_check_reaches_the_terminal_escaped(tmp_path: Path, sim: SimulatorThread) -> None:
    cfg = sim_job(tmp_path, sim, 3)
    with NoBatchServer(401, "bad key \x1b]0;owned\x07\x1b[2J") as server:
        cfg["endpoint"]["base_url"] = server.url
        done = cli_in_process("check", str(write_config(tmp_path, cfg)))
    assert done.returncode == 2
    assert "\x1b" not in done.stdout and "\\x1b]0;owned\\x07" in done.stdout and "refused" in done.stdout
