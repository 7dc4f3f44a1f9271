"""`pipeline show` without the job's config (issue 19 item 15): the request is rebuilt from the job's
stored identity when the config file changed or is gone, and still proven by its request key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import job
from tests.support import cli_in_process, write_config


@pytest.mark.parametrize("change", ["deleted", "edited", "moved folder"])
def test_show_rebuilds_the_request_from_the_stored_identity(tmp_path: Path, change: str) -> None:
    cfg = job(tmp_path, 3)
    path = write_config(tmp_path, cfg)
    assert cli_in_process("run", str(path), "-q").returncode == 0
    if change == "deleted":
        path.unlink()
    elif change == "edited":
        write_config(tmp_path, {**cfg, "prompt": {**cfg["prompt"], "user": "Another prompt: {{ text }}"}})
    else:
        path.rename(tmp_path / "elsewhere.yaml")
    done = cli_in_process("show", str(tmp_path / "out"), "r000001", "--json")
    assert done.returncode == 0, done.stderr
    story = json.loads(done.stdout)
    request = story["request"]
    assert request["verified"] is True, request["note"]
    assert request["key"] == story["record"]["key"]
    assert request["body"]["messages"][-1]["content"].startswith("Review: ")
