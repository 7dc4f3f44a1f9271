"""Issue 23 item 3 on the real local Ray instance and the loopback S3 server: one budget for the whole
Ray job (held by the limiter actor, not split per worker), and one driver per output location (a lease
taken by a conditional PUT with If-None-Match)."""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
import threading
import time
from typing import Any

import pytest

import pipeline
from pipeline.config import load_config
from pipeline.errors import StoreLockedError
from pipeline.read import storage
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import SCHEMA
from tests.support import wait_for

WORKERS, CONCURRENCY, MAX_TOKENS = 4, 8, 50


def _config(bucket: str, url: str, rows: int, **extra: Any) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"rid": [f"r{i:05d}" for i in range(rows)], "text": [f"review {i}: fine" for i in range(rows)]})
    fs, path = storage.filesystem(f"{bucket}/in/rows.parquet")
    pq.write_table(table, path, filesystem=fs)
    cfg: dict[str, Any] = {
        "input": {"path": f"{bucket}/in/rows.parquet", "id_column": "rid", "batch_size": 20},
        "endpoint": {"base_url": url, "model": "openai/gpt-4-turbo", "api_key_env": "SIM_KEY"},
        "prompt": {"user": "Review: {{ text }}"}, "params": {"max_tokens": MAX_TOKENS},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "max_concurrency": CONCURRENCY, "backoff_base_s": 0.01,
                   "backoff_max_s": 0.05},
        "output": {"dir": f"{bucket}/job"}, "run": {"engine": "ray", "workers": WORKERS, "progress": False},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture
def sim(request: Any) -> Any:
    os.environ["SIM_KEY"] = "sk-test"
    s = SimulatorThread(SimConfig(seed=7, latency_ms=getattr(request, "param", 40)))
    url = s.start()
    yield s, url
    s.stop()
    os.environ.pop("SIM_KEY", None)


def _limiter(ray: Any, out: str) -> Any:
    return ray.get_actor("pipeline-limiter-" + hashlib.sha256(out.encode()).hexdigest()[:12], namespace="pipeline")


def test_one_budget_for_the_job_survives_two_killed_workers(s3_bucket: str, ray_local: Any, sim: Any) -> None:
    from pipeline.send.budget import max_cost
    server, url = sim
    cap = 0.12
    cfg = _config(s3_bucket, url, rows=400, budget={"max_cost_usd": cap})
    worst = max_cost(60, MAX_TOKENS, load_config(cfg))  # a generous prompt estimate for "review N: fine"
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(pipeline.run(cfg, quiet=True)))
    runner.start()
    killed: set[int] = set()
    try:
        for share in (0.3, 0.6):
            wait_for(lambda share=share: server.stats()["cost_usd"] >= cap * share or not runner.is_alive(),
                     what=f"{share:.0%} of the budget")
            if not runner.is_alive():
                break
            workers = ray_local.get(_limiter(ray_local, cfg["output"]["dir"]).state.remote())["workers"]
            victim = next(p for p in workers if p not in killed)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        runner.join(timeout=120)
    finally:
        runner.join(timeout=1)
    assert len(killed) == 2, "the run ended before the second kill: raise the cap"
    summary = result[0]
    assert summary.exit_code == 3 and summary.stopped == "budget", summary
    paid = server.stats()["cost_usd"]
    print(f"\ncap={cap} paid={paid:.4f} in-flight bound={CONCURRENCY * worst:.4f} kills=2")
    assert paid <= cap + CONCURRENCY * worst


@pytest.mark.parametrize("sim", [300], indirect=True)
def test_a_second_driver_is_refused_while_the_first_runs_and_admitted_after_it_dies(
        s3_bucket: str, ray_local: Any, sim: Any) -> None:
    from pipeline.engines.ray import run_ray
    from pipeline.engines.ray.lease import LEASE_S, Lease
    server, url = sim
    cfg = _config(s3_bucket, url, rows=40, run={"workers": 2})  # the lease is the driver's: workers do not matter
    first: list[Any] = []
    runner = threading.Thread(target=lambda: first.append(pipeline.run(cfg, quiet=True)))
    runner.start()
    wait_for(lambda: server.stats()["requests"] > 0, what="the first driver sending")
    with pytest.raises(StoreLockedError, match=r"in use by another driver \(pid \d+ on .*, run 2"):
        pipeline.run(cfg, quiet=True)
    runner.join(timeout=120)
    assert first and first[0].exit_code == 0
    out = cfg["output"]["dir"]
    history = storage.read_bytes(f"{out}/history.jsonl").decode().splitlines()
    assert len(history) == 1  # the refused driver does not own the location: it writes nothing there
    # A driver that dies holds its lease until it expires: nobody else runs meanwhile, then one does.
    dead = Lease(out, run_id="dead-driver")
    dead.acquire()
    with pytest.raises(StoreLockedError, match="run dead-driver"):
        run_ray(load_config(cfg), quiet=True)
    later = run_ray(load_config(cfg), quiet=True, clock=lambda: time.time() + LEASE_S + 1)
    assert later.exit_code == 0 and later.requests_sent == 0


def test_lease_generations_expire_renew_and_release(s3_bucket: str) -> None:
    from pipeline.engines.ray.lease import LEASE_S, Lease
    now = [1_000_000.0]
    first = Lease(f"{s3_bucket}/job", run_id="first", clock=lambda: now[0])
    first.acquire()
    second = Lease(f"{s3_bucket}/job", run_id="second", clock=lambda: now[0])
    with pytest.raises(StoreLockedError, match="run first"):
        second.acquire()
    now[0] += LEASE_S / 2
    assert first.renew()
    now[0] += LEASE_S * 0.9
    with pytest.raises(StoreLockedError):  # renewed half a lease ago: still held
        second.acquire()
    now[0] += LEASE_S
    second.acquire()                       # expired: the first driver is taken for dead
    assert not first.renew() and first.lost and "was taken over" in first.lost
    second.release()
    Lease(f"{s3_bucket}/job", run_id="third", clock=lambda: now[0]).acquire()  # released: admitted at once


def test_lease_on_a_local_folder_is_exclusive(tmp_path: Any) -> None:
    from pipeline.engines.ray.lease import Lease
    a, b = Lease(str(tmp_path / "job")), Lease(str(tmp_path / "job"))
    a.acquire()
    with pytest.raises(StoreLockedError):
        b.acquire()
    a.release()
    b.acquire()


def test_a_lease_whose_driver_died_on_this_machine_is_taken_at_once(tmp_path: Any) -> None:
    import subprocess
    import sys

    from pipeline.engines.ray.lease import Lease
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    a = Lease(str(tmp_path / "job"))
    a.me["pid"] = int(dead.stdout)  # the holder was that process, which has exited (a kill -9 leaves this)
    a.acquire()
    b = Lease(str(tmp_path / "job"))
    b.acquire()  # not refused for the minute the dead driver's lease had left
    assert b.generation == 2
    c = Lease(str(tmp_path / "job"))
    with pytest.raises(StoreLockedError):  # b is alive: refused as before
        c.acquire()
    b.release()


def test_conditional_put_is_signed_like_botocore() -> None:
    botocore = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from pipeline.engines.ray.conditional import SigningKey, sign_v4
    data = b'{"holder":"x"}'
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token")
    req = AWSRequest(method="PUT", url="http://127.0.0.1:9/bucket/job/_lease/000000000001.json", data=data,
                     headers={"If-None-Match": "*"})
    botocore.S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    now = datetime.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    headers = {"host": "127.0.0.1:9", "if-none-match": "*", "x-amz-content-sha256": hashlib.sha256(data).hexdigest(),
               "x-amz-date": req.headers["X-Amz-Date"], "x-amz-security-token": "token"}
    mine = sign_v4("PUT", "/bucket/job/_lease/000000000001.json", "", headers, headers["x-amz-content-sha256"],
                   SigningKey(creds.access_key, creds.secret_key, "us-east-1", "s3"), now)
    assert mine == req.headers["Authorization"]
