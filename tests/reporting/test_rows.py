"""`pipeline rows OUT [--failed] [--where EXPR] [-n N] [--json]` (issue 19 item 13): a job's rows for a
terminal and for scripts. Text a server chose (a failure's message here) reaches the terminal with its
control characters spelled out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import job
from tests.support import cli_in_process, write_config

HOSTILE = "bad request \x1b]0;owned\x07\x1b[2J"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    cfg = job(tmp_path, 8, sim={"fault_plan": [{"requests": "1", "fault": "400", "message": HOSTILE}]})
    assert cli_in_process("run", str(write_config(tmp_path, cfg)), "-q").returncode == 1
    return tmp_path / "out"


def _json_rows(*argv: str) -> list[dict]:
    done = cli_in_process("rows", *argv, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_rows_for_scripts_filtered_and_limited(out: Path) -> None:
    rows = _json_rows(str(out))
    assert len(rows) == 8 and {r["outcome"] for r in rows} == {"succeeded", "failed"}
    ok = next(r for r in rows if r["outcome"] == "succeeded")
    assert {"rid", "stars", "sentiment", "score", "cost_usd", "finish_reason"} <= set(ok)
    assert "content" not in ok  # the raw answer: `pipeline show` has it
    failed = _json_rows(str(out), "--failed")
    assert len(failed) == 1 and failed[0]["error_class"] == "permanent" and failed[0]["message"].endswith("\x1b[2J")
    high = _json_rows(str(out), "--where", "score >= 3 AND outcome = 'succeeded'")
    assert high and all(r["score"] >= 3 for r in high) and len(high) < 8
    assert len(_json_rows(str(out), "-n", "3")) == 3
    assert len(_json_rows(str(out), "-n", "0")) == 8


def test_rows_on_a_terminal_escape_server_text(out: Path) -> None:
    done = cli_in_process("rows", str(out), "--failed")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b]0;owned\\x07" in done.stdout and "permanent" in done.stdout


def test_a_where_that_is_not_a_condition_is_a_usage_error(out: Path) -> None:
    for expr, said in (("nonsense > 1", "the columns are"), ("score >>> 3", "not a SQL condition")):
        done = cli_in_process("rows", str(out), "--where", expr)
        assert done.returncode == 2 and said in done.stderr, done.stderr
    assert cli_in_process("rows", str(out.parent / "nowhere")).returncode == 2
