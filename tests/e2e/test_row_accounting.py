"""Row accounting adds up (issue 19 item 14): new, edited, retried, reused and input-failed rows are
counted apart, in summary.json, history.jsonl and the end-of-run line, and sum to the input's rows."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import polars as pl

from tests.conftest import job, write_rows
from tests.support import cli_in_process, write_config

KINDS = ("rows_new", "rows_edited", "rows_retried", "rows_reused", "rows_input_failed")


def _summary(tmp_path: Path) -> dict:
    return orjson.loads((tmp_path / "out" / "summary.json").read_bytes())


def test_new_edited_retried_reused_and_input_failed_rows_add_up(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "in.jsonl", 6)
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"rid": "bad", "text": None, "stars": 1}) + "\n")  # null where the template prints
    cfg = job(tmp_path, 0, sim={"fault_plan": [{"requests": "1", "fault": "400"}]})  # one request fails for good
    path = write_config(tmp_path, cfg)
    first = cli_in_process("run", str(path), "-q")
    assert first.returncode == 1, first.stderr
    s = _summary(tmp_path)
    assert [s[k] for k in KINDS] == [6, 0, 0, 0, 1]
    assert sum(s[k] for k in KINDS) == s["rows_total"] == 7

    failures = pl.read_parquet(tmp_path / "out" / "failures.parquet")
    failed_id = failures.filter(pl.col("error_class") == "permanent")["rid"].item()
    lines = data.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if json.loads(line)["rid"] not in (failed_id, "bad"))
    edited = json.loads(lines[at])
    edited["text"] = "an edited review: now it is broken"
    lines[at] = json.dumps(edited)
    data.write_text("\n".join(lines) + "\n")
    write_rows(tmp_path / "more.jsonl", 1, start=100)
    data.write_text(data.read_text() + (tmp_path / "more.jsonl").read_text())
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    second = cli_in_process("run", str(write_config(tmp_path, cfg)), "-q", "--retry-failed")
    assert second.returncode == 1, second.stderr  # the bad input row still fails
    s = _summary(tmp_path)
    # the appended row, the edited row, the failed request asked again, the input failure, 4 reused
    assert [s[k] for k in KINDS] == [1, 1, 1, 4, 1]
    assert sum(s[k] for k in KINDS) == s["rows_total"] == 8
    record = [json.loads(x) for x in (tmp_path / "out" / "history.jsonl").read_text().splitlines()][-1]
    assert all(record[k] == s[k] for k in KINDS)
    assert "1 edited" in second.stderr and "1 input-failed" in second.stderr
