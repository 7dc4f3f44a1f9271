"""`pipeline run CONFIG --dry-run`: exact figures on a known dataset; resume, cache, failures; sends and
writes nothing."""
from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.config import load_config
from pipeline.engines.estimate import cost_range, dry_run, estimate, report, time_bounds
from pipeline_simulator import SimConfig, SimulatorThread
from tests.conftest import job
from tests.support import cli_in_process

TEXTS = ["a" * 40, "b" * 80, "c" * 120, "a" * 40]  # the last repeats the first: one request for both


def known(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", **sections: Any) -> dict[str, Any]:
    """8 rows: 4 good (3 distinct requests), and one of each kind of row that cannot become a request."""
    with open(tmp_path / "in.jsonl", "w") as fh:
        fh.writelines(json.dumps({"rid": f"r{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS))
        fh.write(json.dumps({"rid": "no-text"}) + "\n")
        fh.write(json.dumps({"rid": "null-text", "text": None}) + "\n")
        fh.write("{not json\n")
        fh.write(json.dumps({"rid": "huge", "text": "x " * 140_000}) + "\n")
    cfg: dict[str, Any] = {
        "input": {"path": str(tmp_path / "in.jsonl"), "id_column": "rid"},
        "endpoint": {"base_url": base_url, "model": "test/model", "api_key_env": "NO_SUCH_KEY_FOR_DRY_RUN"},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"max_tokens": 100},
        "limits": {"requests_per_minute": 6, "tokens_per_minute": 600, "max_concurrency": 2},
        "prices": {"test/model": {"input_per_m": 1000, "output_per_m": 2000}},
        "output": {"dir": str(tmp_path / "out")},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value}
    return cfg


def test_figures_on_a_known_dataset(tmp_path: Path) -> None:
    cfg = load_config(known(tmp_path))
    est = estimate(cfg)
    # Prompt tokens per request (test/model: o200k_base as a proxy, not yet calibrated): 3 priming + 3 a
    # message + role + text; "You label reviews." is 4 tokens, "Review: " + 40 a's / 80 b's / 120 c's 9 / 23 / 33.
    per_row = [3 + (3 + 1 + 4) + (3 + 1 + n) for n in (9, 23, 33)]
    assert per_row == [24, 38, 48]
    assert (est.rows_total, est.rows_to_send, est.requests) == (8, 4, 3)
    assert (est.prompt_tokens, est.output_max, est.images) == (110, 300, 0)
    assert est.rows_failing == 4
    assert est.failing_by_reason == {"missing_column": 1, "null_value": 1, "input": 1, "context": 1}
    assert len(est.examples) == 4 and all(str(tmp_path / "in.jsonl") in e for e in est.examples)
    assert any("row 7" in e and "[input]" in e for e in est.examples)
    assert any("row 8" in e and "context window" in e for e in est.examples)
    assert est.output_likely_per_request is None and (est.rows_done_ok, est.rows_done_failed) == (0, 0)
    low, likely, high = cost_range(est, cfg)  # type: ignore[misc]
    assert (low, likely, high) == (pytest.approx(0.110), None, pytest.approx(0.710))
    bounds = time_bounds(est, cfg)
    assert bounds["requests/min"] == pytest.approx((30.0, 30.0))                     # 3 requests at 6/min
    assert bounds["tokens/min"] == pytest.approx((11.0, 41.0))                        # (110 .. 110+300) at 600/min
    assert bounds["concurrency"] == pytest.approx(((3 * 0.6) / 2, (3 * 0.6 + 300 * 0.03) / 2))
    out = io.StringIO()
    assert dry_run(cfg, out) == 0
    text = out.getvalue()
    for figure in ("8 rows", "3 requests for 4 rows", "110 (", "0 .. 300", "$0.1100 .. $0.7100", "30.0s .. 41.0s",
                   "slowest limit: tokens/min", "would fail      4 rows", "missing_column 1",
                   "0.6 s to the first token"):
        assert figure in text, figure
    assert not (tmp_path / "out").exists()


def test_no_max_tokens_uses_the_model_output_cap(tmp_path: Path) -> None:
    cfg = load_config(known(tmp_path, endpoint={"model": "openai/gpt-4-turbo"}, params={"max_tokens": None}))
    assert estimate(cfg).output_max == 3 * 4096


def test_resume_counts_answered_rows_and_measures_likely_output(tmp_path: Path) -> None:
    cfg = job(tmp_path, 30, sim={"fault_plan": [{"requests": "12-", "fault": "401"}]},
              limits={"max_concurrency": 2})
    cfg["input"]["batch_size"] = 5
    s = pipeline.run(cfg)
    assert s.exit_code == 3 and 0 < s.succeeded < 30
    out = tmp_path / "out"
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}
    cfg["input"]["batch_size"] = 1000  # the job's own batch size (5, in its manifest) decides, as on resume
    est = estimate(load_config(cfg))
    assert (est.rows_done_ok, est.rows_done_failed) == (s.succeeded, 0)
    assert est.rows_to_send == est.requests == 30 - s.succeeded
    assert est.rows_done_ok + est.rows_done_failed + est.rows_cached + est.rows_failing + est.rows_to_send == 30
    db = sqlite3.connect(out / "store.sqlite")
    mean = db.execute("SELECT avg(completion_tokens) FROM responses WHERE state = 'ok'").fetchone()[0]
    db.close()
    assert est.output_likely_per_request == pytest.approx(mean)
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert after == before  # nothing written, not even SQLite's -wal/-shm files
    cfg["prompt"]["user"] = "Changed: {{ text }}"
    changed = estimate(load_config(cfg))
    assert changed.rows_done_ok == 0 and changed.requests == 30 and "different job" in changed.notes[0]


def test_shared_cache_answers_count_as_free(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    assert pipeline.run(job(tmp_path, 6, cache={"dir": cache})).succeeded == 6
    other = job(tmp_path, 6, cache={"dir": cache}, output={"dir": str(tmp_path / "other")})
    est = estimate(load_config(other))
    assert (est.rows_cached, est.requests, est.rows_done_ok) == (6, 0, 0)


def test_images_in_the_estimate_and_unreadable_images_as_failures(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (1024, 1024), (0, 0, 0)).save(tmp_path / "a.png")
    with open(tmp_path / "in.jsonl", "w") as fh:
        fh.writelines(json.dumps({"rid": rid, "text": "t", "img": img}) + "\n"
                      for rid, img in (("ok", "a.png"), ("gone", "missing.png"), ("two", ["a.png", "https://x.org/b.jpg"])))
    cfg = load_config({"input": {"path": str(tmp_path / "in.jsonl"), "id_column": "rid"},
                       "prompt": {"user": "{{ text }}", "images": ["img"], "image_detail": "high"},
                       "params": {"max_tokens": 10}, "output": {"dir": str(tmp_path / "out")}})
    est = estimate(cfg)
    assert (est.images, est.image_tokens, est.requests) == (3, 3 * 765, 2)
    assert est.prompt_tokens == 2 * ((1 + 3) // 4 + 4 + 3) + 3 * 765  # text, one message, priming, images
    assert est.failing_by_reason == {"image": 1} and "missing.png" in est.examples[0]


def test_sends_nothing_and_needs_no_key(tmp_path: Path) -> None:
    thread = SimulatorThread(SimConfig())
    url = thread.start()
    try:
        cfg = load_config(known(tmp_path, base_url=url))
        assert dry_run(cfg, io.StringIO()) == 0
        assert thread.sim.log == [] and thread.stats()["requests"] == 0
    finally:
        thread.stop()


def test_cli_dry_run_of_the_openrouter_config(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    # No OPENROUTER_API_KEY in the run's environment (the CLI helpers drop every *_API_KEY).
    p = cli_in_process("run", str(repo / "configs/openrouter-gpt-4-turbo.yaml"), "--dry-run",
                       "--set", f"output.dir={out}", cwd=repo)
    assert p.returncode == 0, p.stderr
    assert "240 rows" in p.stdout and "openai/gpt-4-turbo: $10/M in, $30/M out" in p.stdout
    assert not out.exists()
    bad = cli_in_process("run", str(repo / "configs/openrouter-gpt-4-turbo.yaml"), "--dry-run",
                         "--set", "input.path=/nope.jsonl", cwd=repo)
    assert bad.returncode == 2 and "nope.jsonl" in bad.stderr


def test_rows_whose_retries_ran_out_are_counted_as_to_send_again(tmp_path: Path) -> None:
    cfg = job(tmp_path, 6, sim={"fault_plan": [{"requests": "1", "fault": "503"}]},
              limits={"max_concurrency": 1, "max_retries": 0})
    s = pipeline.run(cfg)
    assert (s.succeeded, s.failed) == (5, 1)
    est = estimate(load_config(cfg))  # a resume asks the transient failure again, and only it
    assert (est.rows_done_ok, est.rows_done_failed, est.requests) == (5, 0, 1)


def test_dry_run_with_no_request_limit(tmp_path: Path) -> None:
    cfg = load_config(job(tmp_path, 5, limits={"requests_per_minute": None, "tokens_per_minute": None}))
    out = io.StringIO()
    assert dry_run(cfg, out=out) == 0
    assert "requests/min" not in out.getvalue() and "concurrency" in out.getvalue()


def test_packed_rows_are_estimated_as_the_packs_the_run_sends(tmp_path: Path) -> None:
    one = estimate(load_config(job(tmp_path, 10)))
    packed_cfg = job(tmp_path, 10, prompt={"rows_per_request": 4})
    packed = estimate(load_config(packed_cfg))
    assert (one.requests, packed.requests) == (10, 3) and packed.rows_to_send == 10
    assert packed.prompt_tokens < one.prompt_tokens  # the instructions and schema once per pack
    # Packing is not repetition: no row repeats another here.
    assert "3 requests for 10 rows (packs of up to 4 rows)\n" in report(packed, load_config(packed_cfg))
    batch = estimate(load_config({**packed_cfg, "run": {"mode": "batch", "progress": False}}))
    assert batch.requests == 3 and batch.prompt_tokens == packed.prompt_tokens  # one Batch API line a pack
    assert b'{\\"rows\\":[{' in (packed.example or b"")  # the rows, as JSON in the last message
    s = pipeline.run(packed_cfg, quiet=True)
    assert s.exit_code == 0 and s.requests_sent == 3
    after = estimate(load_config(packed_cfg))  # the store is read under the packed keys
    assert (after.rows_done_ok, after.requests) == (10, 0)


def test_a_ray_dry_run_starts_the_budget_where_the_driver_would(tmp_path: Path) -> None:
    # A run without a cap whose endpoint costed nothing leaves no `_budget.json`: the driver's next run
    # starts from the last summary's cost_usd (budget.spent_so_far), and so must the dry run's figure.
    from pipeline.engines.ray.budget import write_spent
    from pipeline.engines.ray.dryrun import journal_spent
    cfg = load_config(known(tmp_path, run={"engine": "ray", "workers": 1}))
    out = Path(cfg.output.dir)
    out.mkdir(parents=True)
    assert journal_spent(cfg) == 0.0
    (out / "summary.json").write_text(json.dumps({"cost_usd": 2.5}))
    assert journal_spent(cfg) == 2.5
    write_spent(cfg.output.dir, cfg.output.storage_options, 3.0, exact=False)  # the file's ceiling, larger
    assert journal_spent(cfg) == 3.0
