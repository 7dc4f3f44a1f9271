"""Issue 19 item 3: every run record (history.jsonl, the metrics file, the webhook) carries what that
run really spent, also when it stopped on a changed input (exit 3) or crashed (exit 70)."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from pipeline.engines import runner
from pipeline.errors import InputChangedError
from pipeline.ops import history
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import job, write_rows
from tests.ops.test_ops import Receiver
from tests.support import TEST_KEY_ENV, cli_in_process, sim_job, wait_for, write_config


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorThread]:
    monkeypatch.setenv(TEST_KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig())
    thread.start()
    yield thread
    thread.stop()


def metric(prom: Path, name: str) -> float:
    return next(s.value for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples
                if s.name == name)


def test_a_run_stopped_by_a_changed_input_records_what_it_spent(tmp_path: Path, sim: SimulatorThread) -> None:
    sim.reset(latency_ms=30)
    data = write_rows(tmp_path / "in.jsonl", 60)
    prom = tmp_path / "pipeline.prom"
    with Receiver() as hook:
        cfg = sim_job(tmp_path, sim, 60, input={"batch_size": 10}, limits={"max_concurrency": 1},
                      output={"metrics_file": str(prom)}, notify={"webhook": hook.url})
        box: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.run(cfg)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                box.append(exc)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: sim.stats()["requests"] >= 3, what="three requests")
        with open(data, "a") as fh:  # another job still writing the file
            fh.write(json.dumps({"rid": "late", "text": "x", "stars": 1}) + "\n")
        t.join(60)
    sim.reset(latency_ms=0)
    assert box and isinstance(box[0], InputChangedError)
    record = history.read(tmp_path / "out")[-1]
    assert (record["exit_code"], record["stop_reason"]) == (3, "input_changed")
    assert record["requests"] >= 3 and record["cost_usd"] > 0
    assert metric(prom, "pipeline_cost_usd_total") == pytest.approx(record["cost_usd"])
    assert orjson.loads(hook.bodies[-1])["cost_usd"] == pytest.approx(record["cost_usd"])


def test_a_crashed_run_records_what_it_spent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in writing a part")

    monkeypatch.setattr(runner, "_write", broken)  # after the first batch was answered and paid for
    cfg = job(tmp_path, 20, input={"batch_size": 10})
    done = cli_in_process("run", str(write_config(tmp_path, cfg)), "-q")
    assert done.returncode == 70, done.stderr
    record = history.read(tmp_path / "out")[-1]
    assert record["exit_code"] == 70 and record["requests"] >= 10 and record["cost_usd"] > 0
