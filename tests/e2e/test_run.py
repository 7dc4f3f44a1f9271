"""End to end: real HTTP over loopback to the simulator, real Parquet read back with polars."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline.errors import ConfigError
from tests.conftest import job, write_rows
from tests.support import assert_each_id_once, cli_in_process, outputs, write_config


def test_api_run_writes_typed_outputs_and_summary(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 30))
    assert (s.exit_code, s.succeeded, s.failed, s.pending) == (0, 30, 0, 0)
    res, fail = outputs(tmp_path / "out")
    assert res.height == 30 and fail.height == 0
    assert isinstance(res.schema["output"], pl.Struct)
    assert set(res["output"].struct.field("sentiment").cast(pl.String).unique()) <= {"positive", "negative", "mixed"}
    assert res["stars"].dtype == pl.Int64
    assert (res["prompt_tokens"] > 0).all() and (res["cost_usd"] > 0).all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("rows_total", "succeeded", "failed", "prompt_tokens", "completion_tokens", "cost_usd", "wall_s",
                "requests_sent", "retries", "config_fingerprint", "versions"):
        assert key in summary
    df = pipeline.load(tmp_path / "out")
    assert {"rid", "stars", "sentiment", "score", "tags", "cost_usd"} <= set(df.columns)


def test_rerun_resumes_without_sending_anything(tmp_path: Path) -> None:
    cfg = job(tmp_path, 25)
    first = pipeline.run(cfg)
    second = pipeline.run(cfg)
    assert first.requests_sent >= 25
    assert second.requests_sent == 0 and second.succeeded == 25 and second.resumed_rows == 25
    assert_each_id_once(tmp_path / "out", 25)


def test_identical_requests_are_sent_once(tmp_path: Path) -> None:
    write_rows(tmp_path / "in.jsonl", 40, dup_every=4)  # 10 distinct texts, 40 rows
    cfg = job(tmp_path, limits={"max_concurrency": 4})
    s = pipeline.run(cfg)
    assert s.succeeded == 40 and s.requests_sent == 10 and s.deduplicated == 30


@pytest.mark.parametrize("fault,extra", [
    ("503", {}), ("500", {}), ("502", {}), ("429", {"retry_after": 0.01}), ("reset", {}), ("malformed", {}),
    ("error_200", {}), ("error_200_partial", {}), ("408", {}), ("524", {}), ("529", {}),
])
def test_transient_faults_are_retried_to_success(tmp_path: Path, fault: str, extra: dict[str, float]) -> None:
    plan = [{"requests": "1-3", "fault": fault, **extra}]
    s = pipeline.run(job(tmp_path, 12, sim={"fault_plan": plan}))
    assert (s.exit_code, s.succeeded, s.failed) == (0, 12, 0)
    assert sum(s.retries.values()) == 3
    assert s.requests_sent == 15


def test_hang_past_the_timeout_is_retried(tmp_path: Path) -> None:
    plan = [{"requests": "1", "fault": "hang"}]
    s = pipeline.run(job(tmp_path, 4, sim={"fault_plan": plan}, endpoint={"timeout_s": 0.5}))
    assert (s.exit_code, s.succeeded) == (0, 4) and s.retries == {"transient": 1}


@pytest.mark.parametrize("fault,status", [("404", 404), ("413", 413), ("422", 422), ("429_too_large", 429),
                                          ("403", 403)])  # the simulator's 403 is a moderation flag on the row
def test_permanent_faults_fail_the_row_without_retry(tmp_path: Path, fault: str, status: int) -> None:
    rule = {"requests": "1", "fault": fault}
    if fault == "404":  # the default 404 is "no endpoints for these parameters", which is a mode fallback
        rule["message"] = "model xyz is not a valid model ID"
    s = pipeline.run(job(tmp_path, 6, sim={"fault_plan": [rule]}, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.failed, s.requests_sent) == (1, 5, 1, 6)
    _, fail = outputs(tmp_path / "out")
    assert fail.row(0, named=True)["error_class"] == "permanent"
    assert fail["status"].to_list() == [status] and fail["attempts"].to_list() == [1]


@pytest.mark.parametrize("fault", ["401", "402", "429_quota"])
def test_run_fatal_stops_dispatch_and_resumes_later(tmp_path: Path, fault: str) -> None:
    cfg = job(tmp_path, 200, sim={"fault_plan": [{"requests": "5-100000", "fault": fault}]},
              limits={"max_concurrency": 4})
    s = pipeline.run(cfg)
    assert s.exit_code == 3 and s.stopped == "fatal"
    assert s.requests_sent <= 4 + 4 + 4  # stops within the requests already in flight, not 200 failures
    assert s.next_step and "pipeline run" in s.next_step
    assert s.failed == 0 and s.pending > 0  # nothing is blamed on the rows: they are resumable
    assert s.succeeded >= 4  # rows answered before the stop are in results.parquet already
    assert pl.read_parquet(tmp_path / "out" / "results.parquet").height == s.succeeded
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    resumed = pipeline.run(cfg)
    assert (resumed.exit_code, resumed.succeeded) == (0, 200)
    assert resumed.requests_sent == 200 - s.succeeded
    assert_each_id_once(tmp_path / "out", 200)


@pytest.mark.parametrize("fault,reason,attempts", [("schema_invalid", "schema", 3), ("refusal", "refusal", 3),
                                                    ("length", "length", 1)])
def test_bad_content_has_its_own_small_budget(tmp_path: Path, fault: str, reason: str, attempts: int) -> None:
    s = pipeline.run(job(tmp_path, 3, sim={"fault_plan": [{"requests": "1-100", "fault": fault}]},
                         limits={"max_concurrency": 1}))
    assert s.exit_code == 1 and s.failed == 3
    _, fail = outputs(tmp_path / "out")
    assert set(fail["error_class"]) == {"bad_content"}
    assert fail["attempts"].to_list() == [attempts] * 3
    assert all(m.startswith(reason) for m in fail["message"])
    assert fail["content"].null_count() == 0  # the raw answer (or the refusal text) is kept


def test_template_using_a_missing_column_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nosuchcol"):
        pipeline.run(job(tmp_path, 3, prompt={"user": "{{ nosuchcol }}"}))


def test_length_retries_once_with_raised_max_tokens(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 2, sim={"fault_plan": [{"requests": "1", "fault": "length"}]},
                         structured={"length_max_tokens": 400}, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.requests_sent) == (0, 2, 3)


def test_bad_rows_become_failures_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    write_rows(data, 5)
    with open(data, "a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"rid": "r-null", "text": None, "stars": 1}) + "\n")
    s = pipeline.run(job(tmp_path))
    assert (s.exit_code, s.succeeded, s.failed) == (1, 5, 2)
    _, fail = outputs(tmp_path / "out")
    assert set(fail["error_class"]) == {"input"}
    messages = " ".join(fail["message"])
    assert "in.jsonl" in messages and "6" in messages and "text" in messages


def test_ten_thousand_rows_under_faults_end_exactly_once(tmp_path: Path) -> None:
    cfg = job(tmp_path, 10_000, sim={"rate_429": 0.05, "rate_503": 0.025, "rate_500": 0.025, "seed": 3,
                                     "retry_after_s": 0.002}, limits={"max_concurrency": 64, "max_retries": 10})
    cfg["input"]["batch_size"] = 2000
    s = pipeline.run(cfg)
    assert (s.exit_code, s.succeeded, s.failed) == (0, 10_000, 0)
    assert s.retries.get("rate_limited", 0) > 300 and s.retries.get("transient", 0) > 300
    assert_each_id_once(tmp_path / "out", 10_000)


def test_cli_demo_config(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    p = cli_in_process("run", str(repo / "configs/demo.yaml"), "--set", f"output.dir={out}", "-q",
                       "--set", "endpoint.simulator.latency_ms=0", cwd=repo)
    assert p.returncode == 0, p.stderr
    assert pl.read_parquet(out / "results.parquet").height == 240
    status = cli_in_process("status", str(out), "--json")
    st = json.loads(status.stdout)
    assert (st["rows_done"], st["rows_pending"], st["running"], st["finished"]) == (240, 0, False, True)


def test_the_progress_bar_counts_rows_on_stderr_unless_quiet(tmp_path: Path) -> None:
    path = write_config(tmp_path, job(tmp_path, 20, run={"progress": True}))
    shown = cli_in_process("run", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "labelling" in shown.stderr and "20/20" in shown.stderr and "outputs in" in shown.stderr
    quiet = cli_in_process("run", str(path), "-q")  # for cron: nothing on stderr when all is well
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_cli_config_errors_name_the_key_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {path: in.jsonl}\nprompt: {user: hi}\noutput: {dir: out}\nlimits: {max_concurency: 3}\n")
    p = cli_in_process("run", str(cfg))
    assert p.returncode == 2
    assert "limits.max_concurency" in p.stderr and "did you mean 'max_concurrency'" in p.stderr
    assert str(cfg) in p.stderr


def test_missing_api_key_is_a_usage_error_before_any_request(tmp_path: Path) -> None:
    cfg = job(tmp_path, 3, endpoint={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "NO_SUCH_KEY_VAR"})
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "store.sqlite").exists()


def test_run_inside_a_running_event_loop(tmp_path: Path) -> None:
    import asyncio

    async def notebook_cell() -> int:
        return pipeline.run(job(tmp_path, 5)).succeeded

    assert asyncio.run(notebook_cell()) == 5


def test_invalid_schema_names_the_key_the_pointer_and_the_file(tmp_path: Path) -> None:
    import yaml

    cfg = job(tmp_path, 3, structured={"schema": {"type": "object", "properties": {"a": {"type": "strin"}}}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = cli_in_process("run", str(path))
    assert p.returncode == 2
    assert str(path) in p.stderr and "structured.schema" in p.stderr and "/properties/a/type" in p.stderr


@pytest.mark.parametrize("fault,stream", [("error_200_partial", False), ("stream_error", True)])
def test_failed_attempts_that_were_billed_count_as_spend(tmp_path: Path, fault: str, stream: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_simulator import SimConfig, SimulatorThread

    monkeypatch.setenv("SIM_KEY", "sk-test")
    costs = []
    for plan in ([], [{"requests": "1-4", "fault": fault}]):
        server = SimulatorThread(SimConfig(retry_after_s=0.01, fault_plan=plan))
        with server as url:
            cfg = job(tmp_path, 6, endpoint={"base_url": url, "api_key_env": "SIM_KEY"}, params={"stream": stream},
                      limits={"max_concurrency": 1})
            cfg["output"]["dir"] = str(tmp_path / f"out{len(plan)}")
            s = pipeline.run(cfg)
            sim_billed = server.stats()["cost_usd"]
        assert (s.exit_code, s.succeeded, s.requests_sent) == (0, 6, 6 + 4 * len(plan))
        costs.append(s.cost_usd)
    clean, faulty = costs
    assert faulty > clean * 1.1  # the 4 broken attempts generated tokens, and those were billed
    if not stream:  # a partial 200 reports its usage: our books match the provider's bill exactly
        assert faulty == pytest.approx(sim_billed)
