"""Nightly jobs (issue 10, issue 13 item 8): input is data, the job is what shapes requests.

Three nights over a growing input send exactly the new requests, and each night's outputs hold exactly
that night's input; settings that do not shape requests never make a new job; a changed job is refused
(also with manifest.json lost, from the store's own record of the job); an input file that changes
while it is read stops the run before outputs mix versions. Every invocation lands in history.jsonl.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline.config import load_config
from pipeline.errors import InputChangedError, JobChangedError
from pipeline.ops import history
from pipeline.read.reader import Source
from pipeline.reporting.status import job_status
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job, write_rows
from tests.support import TEST_KEY_ENV as KEY_ENV
from tests.support import cli, sim_job, wait_for, write_config


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorThread]:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig())
    thread.start()
    yield thread
    thread.stop()


def write_input(path: Path, rows: dict[str, str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"rid": rid, "text": text, "stars": 3}) + "\n" for rid, text in rows.items())


def outputs_by_id(out: Path) -> dict[str, str]:
    """id -> request key of every row in the outputs; each id must be there once."""
    res = pl.read_parquet(out / "results.parquet")
    fail = pl.read_parquet(out / "failures.parquet")
    ids = res["rid"].to_list() + fail["rid"].to_list()
    assert len(ids) == len(set(ids)), "an id twice in the outputs"
    return dict(zip(ids, res["request_key"].to_list() + fail["request_key"].to_list()))


def test_three_nights_over_a_growing_input_send_only_new_requests(tmp_path: Path, sim: SimulatorThread) -> None:
    data = tmp_path / "in.jsonl"
    rows = {f"r{i:04d}": f"review {i}: fine" for i in range(200)}
    write_input(data, rows)
    cfg = sim_job(tmp_path, sim, 0, input={"batch_size": 64})
    out = tmp_path / "out"
    nights: list[tuple[int, pipeline.Summary]] = []

    def night() -> dict[str, str]:
        before = sim.stats()["requests"]
        s = pipeline.run(cfg)
        nights.append((sim.stats()["requests"] - before, s))
        assert s.exit_code == 0
        got = outputs_by_id(out)
        assert set(got) == set(rows)  # exactly this night's input, no more, no less
        return got

    first = night()
    rows.update({f"r{i:04d}": f"review {i}: fine" for i in range(200, 250)})  # +50 appended
    write_input(data, rows)
    second = night()
    assert {k: second[k] for k in first} == first  # old rows keep their answers
    for i in range(5):
        del rows[f"r{i * 40:04d}"]  # 5 removed
    edited = [f"r{i:04d}" for i in range(3, 250, 25)]
    for rid in edited:
        rows[rid] = rows[rid] + " (edited)"  # 10 edited
    rows.update({f"r{i:04d}": f"review {i}: fine" for i in range(250, 300)})  # +50
    write_input(data, rows)
    third = night()
    assert all(third[rid] != second[rid] for rid in edited)
    assert all(third[rid] == second[rid] for rid in third if rid in second and rid not in edited)
    sent = [n for n, _ in nights]
    figures = [(s.requests_sent, s.rows_new, s.rows_edited, s.rows_reused, s.rows_removed) for _, s in nights]
    assert sent == [200, 50, 60]
    assert figures == [(200, 200, 0, 0, 0), (50, 50, 0, 200, 0), (60, 50, 10, 235, 5)]
    runs = history.read(out)
    assert [(r["requests"], r["rows_new"], r["rows_edited"], r["rows_removed"], r["exit_code"]) for r in runs] == [
        (200, 200, 0, 0, 0), (50, 50, 0, 0, 0), (60, 50, 10, 5, 0)]
    assert len({r["run_id"] for r in runs}) == 3 and all(r["finished_at"] >= r["started_at"] for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == runs[-1]["run_id"] and summary["rows_removed"] == 5
    assert len(list((out / "parts").glob("*.r.parquet"))) == -(-295 // 64)  # old parts pruned


def test_what_does_not_shape_requests_is_not_a_new_job(tmp_path: Path) -> None:
    cfg = job(tmp_path, 30, input={"batch_size": 10})
    assert pipeline.run(cfg).requests_sent == 30
    os.utime(tmp_path / "in.jsonl")  # touched
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)  # the job folder moved
    cfg["output"] = {**cfg["output"], "dir": str(moved)}
    cfg["input"]["columns"] = []  # carried columns changed
    cfg["limits"] = {**cfg["limits"], "max_retries": 2, "max_concurrency": 3}
    cfg["budget"] = {"max_cost_usd": 10}
    s = pipeline.run(cfg)
    assert (s.exit_code, s.requests_sent, s.rows_reused) == (0, 0, 30)
    assert "stars" not in pl.read_parquet(moved / "results.parquet").columns


def test_a_changed_job_is_refused_even_without_its_manifest_and_lands_in_the_history(tmp_path: Path) -> None:
    cfg = job(tmp_path, 10)
    pipeline.run(cfg)
    out = tmp_path / "out"
    (out / "manifest.json").unlink()
    cfg["prompt"] = {**cfg["prompt"], "user": "Rate: {{ text }}"}
    with pytest.raises(JobChangedError, match="prompt.user"):
        pipeline.run(cfg)
    refused = history.read(out)[-1]
    assert (refused["exit_code"], refused["stop_reason"]) == (2, "refused") and "prompt.user" in refused["message"]
    # From the command line too: exit 2, and one more history record.
    done = cli("run", str(write_config(tmp_path, cfg)), "-q")
    assert done.returncode == 2 and "prompt.user" in done.stderr
    assert [r["exit_code"] for r in history.read(out)] == [0, 2, 2]
    assert (out / "manifest.json").exists()  # rebuilt from the store, not from the refused config
    assert json.loads((out / "manifest.json").read_text())["request"]["prompt"]["user"] == "Review: {{ text }}"


def test_a_file_rewritten_in_place_between_scan_and_read_is_caught(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "in.jsonl", 30)
    cfg = load_config(job(tmp_path, 30, input={"batch_size": 10}))
    source = Source(cfg.input)
    source.scan()
    stat = data.stat()
    text = data.read_bytes().replace(b"review number 15", b"review number 99")  # same size
    data.write_bytes(text)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    batches = source.batches()
    assert next(batches).index == 0  # rows 0-9 are as the scan read them
    with pytest.raises(InputChangedError, match="in.jsonl"):
        next(batches)


def test_an_input_file_that_grows_during_a_run_stops_it_before_outputs_mix(tmp_path: Path,
                                                                          sim: SimulatorThread) -> None:
    sim.reset(latency_ms=30)
    data = write_rows(tmp_path / "in.jsonl", 100)
    cfg = sim_job(tmp_path, sim, 100, input={"batch_size": 10}, limits={"max_concurrency": 1})
    box: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run(cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: sim.stats()["requests"] >= 1, what="the first request")
    with open(data, "a") as fh:  # another job still writing the file
        fh.write(json.dumps({"rid": "late", "text": "x", "stars": 1}) + "\n")
    t.join(60)
    assert box and isinstance(box[0], InputChangedError) and box[0].exit_code == 3
    out = tmp_path / "out"
    assert not (out / "results.parquet").exists()  # no outputs from two versions
    assert history.read(out)[-1]["stop_reason"] == "input_changed"
    events = [json.loads(line) for line in (out / "pipeline.log").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "stop"] == ["input_changed"]
    sim.reset(latency_ms=0)
    s = pipeline.run(cfg)  # once the file is complete: the answers so far are kept
    assert (s.exit_code, s.succeeded) == (0, 101) and s.rows_reused >= 1
    assert job_status(str(write_config(tmp_path, cfg)))["last_runs"][-1]["exit_code"] == 0




def test_a_job_folder_from_before_input_was_data_is_the_same_job(tmp_path: Path) -> None:
    """A manifest of version 1 recorded `input` in the job's request and no identity in the store."""
    import sqlite3

    cfg = job(tmp_path, 10)
    pipeline.run(cfg)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(version=1, fingerprint="0123456789abcdef",
                    request={**manifest["request"], "input": {"path": cfg["input"]["path"], "id_column": "rid"}})
    (out / "manifest.json").write_text(json.dumps(manifest))
    db = sqlite3.connect(out / "store.sqlite")
    db.execute("DELETE FROM meta WHERE name = 'job_identity'")
    db.commit()
    db.close()
    s = pipeline.run(cfg)
    assert (s.exit_code, s.requests_sent, s.rows_reused) == (0, 0, 10)
    cfg["params"] = {**cfg["params"], "temperature": 0.7}
    with pytest.raises(JobChangedError, match="params.temperature"):  # and a real change is still one
        pipeline.run(cfg)
