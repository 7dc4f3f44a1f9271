"""Done means: rows from s3://, run.engine: ray with 4 workers against a separately started simulator
(5% 429, 5% 5xx, an enforced requests/min limit); one worker process killed mid-run, then the driver
killed; the same command again: every row exactly once in the outputs on s3://, and the requests paid
twice counted and within the in-flight bound.

The driver runs as a subprocess (`python -m pipeline run`) that joins this session's Ray instance, so it
can be killed like a user's terminal. PIPELINE_RAY_KILL_ROWS sets the size (CI: 5000; default 1500)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.read import storage
from pipeline.simulator import SimConfig
from pipeline.simulator.thread import SimulatorThread

from .conftest import REPO, SCHEMA

ROWS = int(os.environ.get("PIPELINE_RAY_KILL_ROWS", "1500"))
CONCURRENCY, RPM, WORKERS = 32, 30_000, 4


def _wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _driver(cfg_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_worker_then_driver_then_rerun(tmp_path: Path, s3_bucket: str, ray_local: Any) -> None:
    ray = ray_local
    table = pa.table({"rid": [f"r{i:06d}" for i in range(ROWS)],
                      "text": [f"review {i}: works fine, arrived late" for i in range(ROWS)]})
    fs, path = storage.filesystem(f"{s3_bucket}/in/rows.parquet")
    pq.write_table(table, path, filesystem=fs, row_group_size=500)
    sim = SimulatorThread(SimConfig(rate_429=0.05, rate_500=0.05, retry_after_s=0.05, rpm=RPM, latency_ms=20,
                                    seed=11))
    url = sim.start()
    out = f"{s3_bucket}/job"
    cfg = {
        "input": {"path": f"{s3_bucket}/in/*.parquet", "id_column": "rid", "batch_size": 100},
        "endpoint": {"base_url": url, "model": "openai/gpt-4-turbo", "api_key_env": "SIM_KEY"},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 200},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": RPM, "max_concurrency": CONCURRENCY, "backoff_base_s": 0.02,
                   "backoff_max_s": 0.1, "max_retries": 10},
        "output": {"dir": out, "fsync_interval_s": 0.2},
        "run": {"engine": "ray", "workers": WORKERS, "ray_address": ray.get_runtime_context().gcs_address,
                "progress": False},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SIM_KEY": "sk-test", "PYTHONPATH": str(REPO)}
    served = lambda: sim.stats()["requests"]  # noqa: E731
    try:
        driver = _driver(cfg_path, env)
        _wait(lambda: served() >= ROWS // 4 or driver.poll() is not None, "a quarter of the requests")
        assert driver.poll() is None, driver.communicate()[0].decode()[-3000:]
        limiter = ray.get_actor("pipeline-limiter-" + _hash(out), namespace="pipeline")
        victim = next(iter(ray.get(limiter.state.remote())["workers"]))
        os.kill(victim, signal.SIGKILL)                       # one worker process dies mid-run
        _wait(lambda: served() >= ROWS // 2, "half of the requests after the worker died")
        driver.kill()                                         # then the driver
        driver.wait(timeout=30)
        rerun = _driver(cfg_path, env)                        # the same command again
        output, _ = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, output.decode()[-3000:]
        stats = sim.stats()
    finally:
        sim.stop()
    ids = _read_ids(f"{out}/results.parquet")
    assert len(ids) == ROWS and len(set(ids)) == ROWS          # every row exactly once
    assert _read_ids(f"{out}/failures.parquet") == []
    paid_twice = sum(n - 1 for n in stats["served_by_body"].values() if n > 1)
    # In flight at each kill: the killed process's requests plus answers not yet in a committed segment.
    bound = 2 * (CONCURRENCY + math.ceil(RPM / 60 * 0.2))
    print(f"\nrows={ROWS} requests={stats['requests']} by_status={stats['by_status']} "
          f"paid_twice={paid_twice} bound={bound}")
    assert paid_twice <= bound


def _hash(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_ids(folder: str) -> list[str]:
    ids: list[str] = []
    for uri in storage.list_files(folder):
        fs, path = storage.filesystem(uri)
        ids += pq.read_table(path, filesystem=fs, columns=["rid"])["rid"].to_pylist()
    return ids
