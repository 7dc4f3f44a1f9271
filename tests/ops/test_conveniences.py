"""Conveniences a user reached for (issue 19 item 15): notify.format for Slack and Teams, job.name in
the webhook, the metrics and status, timestamps on log lines off a terminal, and a crontab line that
works under cron's PATH. The webhook receiver is a real aiohttp server on 127.0.0.1."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from tests.conftest import REPO, job, write_rows
from tests.ops.test_ops import Receiver
from tests.support import cli_in_process, write_config

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


@pytest.mark.parametrize("fmt", ["slack", "teams", "json"])
def test_the_webhook_speaks_slack_teams_or_json_and_names_the_job(tmp_path: Path, fmt: str) -> None:
    with Receiver() as hook:
        summary = pipeline.run(job(tmp_path, 3, job={"name": "nightly-reviews"},
                                   notify={"webhook": hook.url, "on": ["success"], "format": fmt},
                                   output={"metrics_file": str(tmp_path / "job.prom")}))
    assert summary.exit_code == 0 and len(hook.bodies) == 1
    body = json.loads(hook.bodies[0])
    if fmt == "slack":
        assert set(body) == {"text"} and "pipeline job nightly-reviews: success (exit 0)" in body["text"]
        assert "3 succeeded, 0 failed, 0 pending of 3 rows" in body["text"]
    elif fmt == "teams":
        assert body["@type"] == "MessageCard" and body["title"] == "pipeline job nightly-reviews: success (exit 0)"
        assert "3 succeeded" in body["text"]
    else:
        assert body["job"] == "nightly-reviews" and body["out_dir"] == str(tmp_path / "out")
        assert body["rows_total"] == 3 and body["exit_code"] == 0
    metrics = (tmp_path / "job.prom").read_text()
    labels = {s.labels.get("job") for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    assert labels == {"nightly-reviews"}
    status = cli_in_process("status", str(tmp_path / "out"))
    assert f"nightly-reviews ({tmp_path / 'out'})" in status.stdout


def test_job_name_is_not_the_jobs_identity(tmp_path: Path) -> None:
    cfg = job(tmp_path, 3)
    assert pipeline.run(cfg).exit_code == 0
    again = pipeline.run({**cfg, "job": {"name": "renamed"}})
    assert again.exit_code == 0 and again.requests_sent == 0


def test_log_lines_off_a_terminal_carry_the_date_and_time(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_rows(folder / "a.jsonl", 3)
    (folder / "notes.csv").write_text("x\n")  # a warning, logged before the run
    cfg = job(tmp_path, 1, input={"path": str(folder)}, run={"progress": True, "progress_interval_s": 1e-9})
    done = cli_in_process("run", str(write_config(tmp_path, cfg)))  # stderr is not a terminal here
    assert done.returncode == 0, done.stderr
    warning = next(line for line in done.stderr.splitlines() if "skipped" in line)
    assert ISO_LINE.match(warning), warning
    progress = [line for line in done.stderr.splitlines() if "labelling:" in line]
    assert progress and all(ISO_LINE.match(line) for line in progress)


def test_the_readme_crontab_line_runs_pipeline_by_its_absolute_path() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```cron\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        command = line.split(None, 5)[5]
        for step in command.split("&&"):
            words = [w for w in shlex.split(step.split(">>")[0]) if "=" not in w.split("/")[0]]
            if words and words[0] != "cd":
                assert words[0].startswith("/") and words[0].endswith("/pipeline"), words[0]
