"""Errors before anything is sent (issue 19 item 8): a config under which no row could succeed is a
config error naming the key (exit 2), never a failure per row, a hang, or a job written among the configs;
and a retry budget is not part of the job."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.core.interrupt import Interrupt
from pipeline.engines.runner import run_async
from tests.conftest import job
from tests.support import cli_in_process, write_config


@pytest.mark.parametrize(("key", "value", "said"), [
    ("endpoint.base_url", "http://", "has no host name"),
    ("endpoint.base_url", "http://127.0.0.1:70000/v1", "port is not a number from 1 to 65535"),
    ("notify.webhook", "https://", "has no host name"),
    ("output.dir", "''", "is empty"),
    ("limits.requests_per_minute", "1e-9", "less than one a day"),
    ("limits.tokens_per_minute", "150", "less than any request needs"),
])
def test_a_config_no_row_could_succeed_under_is_refused_naming_the_key(
        tmp_path: Path, key: str, value: str, said: str) -> None:
    path = write_config(tmp_path, job(tmp_path, 3))  # params.max_tokens is 200
    done = cli_in_process("run", str(path), "--set", f"{key}={value}", "-q")
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and said in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "store.sqlite").exists()


def test_a_slow_limit_is_said_before_sending(tmp_path: Path) -> None:
    """One request a minute for 3 rows is fine; the warning is for a job that needs more than a day."""
    path = write_config(tmp_path, job(tmp_path, 3))
    done = cli_in_process("run", str(path), "--set", "limits.requests_per_minute=0.002", "--dry-run")
    assert done.returncode == 0
    assert "limits.requests_per_minute" in done.stderr + done.stdout and "day" in done.stderr + done.stdout


def test_changing_a_retry_budget_is_the_same_job(tmp_path: Path) -> None:
    path = write_config(tmp_path, job(tmp_path, 3))
    assert cli_in_process("run", str(path), "-q").returncode == 0
    again = cli_in_process("run", str(path), "-q", "--set", "structured.bad_content_retries=5")
    assert again.returncode == 0, again.stderr
    assert "different job" not in again.stderr


def test_the_runner_says_a_slow_limit_before_sending(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(job(tmp_path, 3), {"limits.requests_per_minute": 0.002})
    interrupt = Interrupt()
    interrupt.trigger_threadsafe()  # Ctrl-C before the start: the run stops before sending anything
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = asyncio.run(run_async(cfg, interrupt=interrupt, quiet=True))
    assert summary.requests_sent == 0
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "slow_limit"]
    assert len(said) == 1 and "cannot finish within a day" in said[0] and "limits.requests_per_minute" in said[0]
