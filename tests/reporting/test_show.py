"""`pipeline show OUT_DIR ROW_ID`: the request re-rendered and proved by its key, attempts, raw answer, cost."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import polars as pl
import pytest
import yaml

import pipeline
from pipeline import cli
from pipeline.prepare.request import request_key
from tests.conftest import job

SECRET = "sk-or-v1-SHOW-TEST-SECRET"


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPENROUTER_API_KEY", SECRET)
    cfg = job(tmp_path, 12, sim={"fault_plan": [{"requests": "2", "fault": "400"}]})
    # From a file, as a user runs it: `show` rebuilds the job from the config the folder records.
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = pipeline.run(str(path), quiet=True)
    assert (summary.succeeded, summary.failed) == (11, 1)
    return Path(summary.out_dir)


def _show(out: Path, row_id: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli.main(["show", str(out), row_id, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_show_an_answered_row(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = pl.read_parquet(out / "results.parquet").row(0, named=True)
    code, text = _show(out, row["rid"], capsys, "--json")
    assert code == 0 and SECRET not in text
    story = json.loads(text)
    req = story["request"]
    assert req["verified"] is True and req["headers"]["Authorization"] == "Bearer [redacted]"
    # The body shown hashes to the key stored with the answer: it is the body that was sent.
    assert request_key(req["body"], "simulator") == row["request_key"] == req["key"]
    text_in = {r["rid"]: r["text"] for r in map(json.loads, (out.parent / "in.jsonl").read_text().splitlines())}
    assert req["body"]["messages"][-1]["content"] == f"Review: {text_in[row['rid']]}"
    assert story["record"]["state"] == "ok" and story["record"]["raw"]["choices"]
    assert story["row"]["cost_usd"] == pytest.approx(row["cost_usd"])
    code, plain = _show(out, row["rid"], capsys)
    assert code == 0 and "exact body sent" in plain and "== response (raw, as stored)" in plain
    assert f"${row['cost_usd']:.6f}" in plain and SECRET not in plain


def test_show_a_failed_row_with_its_attempts(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = pl.read_parquet(out / "failures.parquet").row(0, named=True)
    key = failed["request_key"]
    # pipeline.log as contract 2 defines it (another key's event must not show up).
    events = [{"ts": "2026-01-01T00:00:00Z", "level": "WARNING", "event": "attempt_failed", "msg": "",
               "key": key, "attempt": 1, "status": 400, "error_class": "permanent", "retry_in_s": None},
              {"ts": "2026-01-01T00:00:00Z", "level": "WARNING", "event": "attempt_failed", "msg": "",
               "key": "other", "attempt": 1, "status": 503, "error_class": "transient", "retry_in_s": 0.1}]
    (out / "pipeline.log").write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\nnot json\n")
    code, text = _show(out, failed["rid"], capsys, "--json")
    story = json.loads(text)
    assert code == 0 and story["outcome"] == "failed"
    assert [a["status"] for a in story["attempts"]] == [400]
    assert story["record"]["state"] == "permanent" and story["request"]["verified"] is True
    code, plain = _show(out, failed["rid"], capsys)
    assert "attempt 1" in plain and "status 400  permanent  final" in plain and failed["message"][:30] in plain


def test_show_says_when_the_body_cannot_be_proved(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = pl.read_parquet(out / "results.parquet").row(0, named=True)
    data = out.parent / "in.jsonl"
    data.write_text(data.read_text().replace("review number", "edited review number"))
    code, text = _show(out, row["rid"], capsys, "--json")
    story = json.loads(text)
    assert code == 0 and story["request"]["verified"] is False
    assert "NOT necessarily the body that was sent" in story["request"]["note"]


def test_show_unknown_row(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _show(out, "no-such-row", capsys)
    assert code == 2 and "no row with rid = 'no-such-row'" in text


def test_show_a_packed_row_proves_its_key_and_shows_it_as_a_pack_of_itself(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(tmp_path, 6, prompt={"rows_per_request": 3})))
    summary = pipeline.run(str(path), quiet=True)
    assert summary.succeeded == 6 and summary.requests_sent == 2
    row = pl.read_parquet(Path(summary.out_dir) / "results.parquet").row(4, named=True)
    code, text = _show(Path(summary.out_dir), row["rid"], capsys, "--json")
    req = json.loads(text)["request"]
    assert code == 0 and req["verified"] is True and "pack" in req["note"]
    rows = orjson.loads(req["body"]["messages"][-1]["content"])["rows"]
    assert [r["input"] for r in rows] == [f"review number {int(row['rid'][1:])}: works fine, arrived late"]
    assert req["body"]["messages"][-2] == {"role": "user", "content": "Review: "}
    assert json.loads(text)["record"]["raw"] == json.loads(row["content"])  # the row's own part of the answer
