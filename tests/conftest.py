"""Shared fixtures: small real datasets and job configs pointed at the built-in simulator."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "score"],
}


def write_rows(path: Path, n: int, *, start: int = 0, dup_every: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(start, start + n):
            text = f"review number {i // dup_every if dup_every else i}: works fine, arrived late"
            fh.write(json.dumps({"rid": f"r{i:06d}", "text": text, "stars": i % 5 + 1}) + "\n")
    return path


def job(tmp_path: Path, rows: int = 20, *, sim: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A job config dict over `rows` generated rows, answered by an in-process simulator."""
    data = tmp_path / "in.jsonl"
    if not data.exists():
        write_rows(data, rows)
    cfg: dict[str, Any] = {
        "input": {"path": str(data), "id_column": "rid", "columns": ["stars"]},
        "endpoint": {"base_url": "simulator", "model": "openai/gpt-4-turbo", "simulator": {"retry_after_s": 0.01, **(sim or {})}},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 200},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "max_concurrency": 16, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "output": {"dir": str(tmp_path / "out")},
        "run": {"progress": False},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture
def repo() -> Path:
    return REPO


# -- object storage: one S3-compatible server on 127.0.0.1 per session (moto), dummy credentials --------

@pytest.fixture(scope="session")
def s3_server() -> Any:
    """The loopback S3 endpoint URL; AWS_* point every client (pyarrow, Ray workers) at it, nowhere else."""
    import os
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, request: Any) -> str:
    """A fresh bucket per test: s3://<name>."""
    import re

    import pyarrow.fs as pafs
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    fs = pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True, allow_bucket_deletion=True)
    fs.create_dir(name)
    return f"s3://{name}"


# -- Ray: one real local instance per test session (2 CPUs), started after the S3 env is in place --------

def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist registers it too; here so that plain `pytest` without the plugin knows the mark.
    config.addinivalue_line("markers", "xdist_group(name): run on the worker that runs the rest of the group")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) tests that share an expensive
    fixture run on one worker: every Ray test on the worker that started the session's Ray instance (a
    second instance would double Ray's processes on 2 cores), and a module's tests that share a
    module-scoped fixture (a demo run, a browser page) where it was built. Everything else is handed out
    one test at a time. Without xdist the mark is inert."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if "ray_local" in defs:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif any(d.scope in ("module", "class", "package") for ds in defs.values() for d in ds):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Any:
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, namespace="pipeline", include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")  # loopback only
    yield ray
    ray.shutdown()
