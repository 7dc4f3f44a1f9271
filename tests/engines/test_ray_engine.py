"""run.engine: ray on a real local Ray instance (one per session): same config, CLI, outputs and
guarantees as the local engine; input and outputs on a loopback S3 server."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import JobChangedError
from pipeline.read import storage
from tests.conftest import job


def _read(uri: str) -> Any:
    fs, path = storage.filesystem(uri) if storage.is_remote(uri) else (None, uri)
    return pq.read_table(path, filesystem=fs)


def test_ray_engine_local_folder(tmp_path: Path, ray_local: Any) -> None:
    cfg = job(tmp_path, rows=40, input={"batch_size": 10}, run={"engine": "ray", "workers": 2},
              sim={"rate_500": 0.1, "seed": 3})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 40, summary
    ids = _read(str(tmp_path / "out" / "results.parquet"))["rid"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(40)]
    again = pipeline.run(cfg, quiet=True)
    assert again.requests_sent == 0 and again.resumed_rows == 40 and again.succeeded == 40
    # Shards are named by content: an edited row is the one request sent; the other rows of its shard
    # are answered from the journal.
    data = tmp_path / "in.jsonl"
    data.write_text(data.read_text().replace("review number 3:", "review number 3 (edited):"))
    edited = pipeline.run(cfg, quiet=True)
    assert (edited.requests_sent, edited.rows_edited, edited.rows_new, edited.succeeded) == (1, 1, 0, 40), edited
    # What shapes requests is the job: a changed prompt is refused, naming the key.
    cfg["prompt"]["user"] = "Text: {{ text }}"
    with pytest.raises(JobChangedError, match="prompt.user"):
        pipeline.run(cfg, quiet=True)


def test_label_adds_typed_columns_and_reuses_the_journal(tmp_path: Path, ray_local: Any) -> None:
    import pyarrow as pa

    import pipeline.ray as pray
    from tests.conftest import SCHEMA
    ray = ray_local
    rows = [{"rid": f"r{i:03d}", "text": f"review {i}: fine"} for i in range(30)]
    cfg = {"input": {"id_column": "rid", "path": "unused", "batch_size": 16},
           "endpoint": {"base_url": "simulator", "simulator": {"fault_plan": [{"requests": "3", "fault": "400"}]}},
           "prompt": {"user": "{{ text }}"}, "structured": {"schema": SCHEMA},
           "limits": {"requests_per_minute": 6000, "max_concurrency": 8},
           "output": {"dir": str(tmp_path / "label")}, "run": {"workers": 2, "progress": False}}
    labelled = pray.label(ray.data.from_items(rows), cfg)
    out = labelled.to_arrow_refs()
    table = pa.concat_tables(ray.get(out))
    assert table.num_rows == 30 and pa.types.is_struct(table.schema.field("output").type)
    classes = table.column("error_class").to_pylist()
    assert classes.count("permanent") == 1 and classes.count(None) == 29  # a failed row is a row, not a task
    ok = next(r for r in table.to_pylist() if r["error_class"] is None)
    assert ok["output"]["sentiment"] in ("positive", "negative", "mixed") and ok["cost_usd"] > 0
    journal = list((tmp_path / "label" / "_journal").rglob("*.parquet"))
    assert journal  # committed before the block was returned
    again = pa.concat_tables(ray.get(pray.label(ray.data.from_items(rows), cfg).to_arrow_refs()))
    def keys(t: pa.Table) -> dict[str, str]:  # Ray Data does not keep the rows' order between runs
        return dict(zip(t.column("rid").to_pylist(), t.column("request_key").to_pylist()))
    assert keys(again) == keys(table)
    assert len(list((tmp_path / "label" / "_journal").rglob("*.parquet"))) == len(journal)  # nothing paid again


def test_ray_is_imported_only_by_the_ray_engine(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO
    code = ("import sys, pipeline, pipeline.cli, pipeline.ray, pipeline.engines.runner\n"
            "from pipeline.read import storage\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n"
            "pipeline.run(" + repr(job(tmp_path, rows=3)) + ", quiet=True)\n"
            "assert 'ray' not in sys.modules, 'ray imported by the local engine'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_run_fatal_answer_stops_with_exit_3_and_resumes(tmp_path: Path, ray_local: Any) -> None:
    cfg = job(tmp_path, rows=20, input={"batch_size": 10}, run={"engine": "ray", "workers": 2},
              sim={"fault_plan": [{"requests": "1-", "fault": "401"}]})
    stopped = pipeline.run(cfg, quiet=True)
    assert stopped.exit_code == 3 and stopped.stopped == "fatal" and stopped.pending == 20
    assert "re-run" in stopped.next_step or "resume" in stopped.next_step
    cfg["endpoint"]["simulator"] = {}
    assert pipeline.run(cfg, quiet=True).succeeded == 20  # the same job resumes once the key works


def test_the_budget_is_one_for_all_workers_and_a_dead_workers_reservations_count() -> None:
    import asyncio

    from pipeline.engines.ray.budget import CHUNK, DEAD_S, JobBudget

    async def scenario() -> None:
        now = [100.0]
        persisted: list[float] = []
        b = JobBudget(1.0, 0.25, clock=lambda: now[0], persist=lambda ceiling, _: persisted.append(ceiling))
        for w in ("a", "b", "c"):
            b.hello(w, "1")
        assert [await b.reserve(w, 0.2) for w in ("a", "b", "c")] == ["ok", "ok", "ok"]  # 0.25 + 0.6 <= 1
        assert persisted and persisted[-1] >= 0.85 + CHUNK  # written ahead of what is granted
        assert await b.reserve("a", 0.2, wait_s=0) == "wait"  # would pass the cap: others in flight may settle
        b.settle("a", 0.2, 0.05)
        assert await b.reserve("a", 0.2, wait_s=0) == "ok"
        b.hello("b", "2")  # Ray restarted b: its reservation may have been paid, it counts as spent
        assert b.state()["lost"] == 0.2 and abs(b.spent - 0.5) < 1e-9
        now[0] += DEAD_S + 1  # c went silent: taken for dead, its reservation counted too
        b.seen("a")
        assert await b.reserve("a", 0.1, wait_s=0) == "ok"  # 0.7 spent (0.4 of it lost) + 0.3 held = the cap
        assert abs(b.state()["lost"] - 0.4) < 1e-9 and abs(b.spent - 0.7) < 1e-9
        b.settle("a", 0.2, 0.1)
        b.settle("a", 0.1, 0.05)
        assert abs(b.spent - 0.85) < 1e-9
        assert await b.reserve("a", 0.5, wait_s=0) == "exceeded"  # nothing in flight and it does not fit

    asyncio.run(scenario())


def test_more_workers_than_slots_is_a_config_error(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="run.workers=8 is more than limits.max_concurrency=4"):
        load_config(job(tmp_path, rows=4, run={"engine": "ray", "workers": 8}, limits={"max_concurrency": 4}))


def test_ray_engine_with_packs_same_labels_as_local_and_resumes(tmp_path: Path, ray_local: Any) -> None:
    """prompt.rows_per_request on Ray: packs through the same core; rows land once, typed as locally, with
    each row's confidence measured on its own part of the packed answer as locally."""
    sure = {"accuracy": {"openai/gpt-4-turbo": 0.8}}
    local = job(tmp_path, rows=40, input={"batch_size": 20}, prompt={"rows_per_request": 8},
                output={"dir": str(tmp_path / "local")}, sim={"seed": 3, **sure}, quality={"confidence": "logprobs"})
    on_ray = job(tmp_path, rows=40, input={"batch_size": 20}, prompt={"rows_per_request": 8},
                 run={"engine": "ray", "workers": 2}, sim={"rate_500": 0.1, "seed": 3, **sure},
                 quality={"confidence": "logprobs"})
    summary = pipeline.run(on_ray, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 40, summary
    assert summary.requests_sent <= 8 + 40 * 0.5  # packs of 8 (and retries of the 500s), never one by one
    assert pipeline.run(local, quiet=True).exit_code == 0
    ray_rows = _read(str(tmp_path / "out" / "results.parquet"))
    local_rows = _read(str(tmp_path / "local" / "results.parquet"))
    assert ray_rows.schema == local_rows.schema
    by_id = {r["rid"]: (r["output"], r["confidence"]) for r in local_rows.to_pylist()}
    assert {r["rid"]: (r["output"], r["confidence"]) for r in ray_rows.to_pylist()} == by_id
    assert all(c is not None for _, c in by_id.values()) and min(c for _, c in by_id.values()) < 0.9
    again = pipeline.run(on_ray, quiet=True)
    assert again.requests_sent == 0 and again.resumed_rows == 40 and again.succeeded == 40


def test_the_job_budget_reserves_at_the_learned_markup_and_persists_it() -> None:
    import asyncio

    from pipeline.engines.ray.budget import JobBudget

    async def scenario() -> None:
        persisted: list[tuple[float, str]] = []
        b = JobBudget(1.0, 0.0, persist=lambda ceiling, learned: persisted.append((ceiling, learned)))
        assert b.markup == 1.0
        await b.learn(0.010, 0.001)  # the endpoint billed 10x what the table prices the answer at
        assert b.markup == 10.0 and persisted[-1][1] == "0.01 0.001"  # kept at once, not only at the end
        await b.learn(0.0101, 0.001)  # moved by under 1%: not worth a write
        assert len(persisted) == 1
        resumed = JobBudget(1.0, 0.5, learned=b.rate.learned())  # the next run's actor
        assert abs(resumed.markup - 10.05) < 1e-9 and resumed.state()["learned"] == b.rate.learned()

    asyncio.run(scenario())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_uploads_leftover_is_swept_and_parts_are_kept(tmp_path: Path, s3_bucket: str, where: str) -> None:
    from pipeline.config import load_config
    from pipeline.engines.ray.plan import RayJob
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/job"
    cfg = load_config(job(tmp_path, rows=3, output={"dir": out}, run={"engine": "ray"}))
    names = ["results.parquet/part-00aa.parquet", "failures.parquet/part-00aa.parquet",
             "results.parquet/.tmp-1f2e-part-00bb.parquet", "results.parquet/.part-00bb.parquet.9c1d.tmp",
             "failures.parquet/.tmp-77aa-part-00bb.parquet"]
    for name in names:
        storage.write_bytes(storage.join(out, name), b"x", root=out if where == "local" else None)
    RayJob(cfg).sweep()
    left = sorted(u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1] for u in storage.list_files(out))
    assert left == sorted(names[:2])
