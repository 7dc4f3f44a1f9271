"""Prompt caching end to end on the simulator: cached tokens per row, their lower price, the summary's
hit share and saving, and Anthropic-style breakpoints that only cache when marked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from tests.conftest import job
from tests.support import cli_in_process

# ~1,400 tokens of instructions and examples shared by every row (the simulator counts ~4 characters a token).
SHARED = "You label product reviews by sentiment. " + " ".join(
    f"Example {i}: 'the item number {i} was as described' -> positive." for i in range(110)) + "\n\nReview: "


def run(tmp_path: Path, model: str, cache: str = "auto", rows: int = 24, **sim: Any) -> tuple[Any, pl.DataFrame]:
    tmp_path.mkdir(exist_ok=True)
    cfg = job(tmp_path, rows, sim={"cached_tokens_ratio": 0.0, **sim},
              endpoint={"model": model}, prompt={"system": None, "user": SHARED + "{{ text }}", "cache": cache},
              limits={"max_concurrency": 1}, output={"metrics_file": str(tmp_path / "job.prom")})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0
    return summary, pl.read_parquet(Path(summary.out_dir) / "results.parquet")


def test_openai_models_read_the_shared_prefix_from_the_cache(tmp_path: Path) -> None:
    summary, results = run(tmp_path, "openai/gpt-4o-mini")
    cached = results["cached_tokens"].to_list()
    # The first request writes the cache (OpenAI: free), every later one reads 1,024 + k*128 tokens of it.
    assert sorted(cached)[0] == 0 and sum(1 for c in cached if c) == len(cached) - 1
    assert all(c >= 1024 and (c - 1024) % 128 == 0 for c in cached if c)
    assert (results["cached_tokens"] < results["prompt_tokens"]).all()
    # Charged at gpt-4o-mini's own rates ($0.15 in, $0.075 cached, $0.60 out), as the endpoint reported.
    expected = ((results["prompt_tokens"] - results["cached_tokens"]) * 0.15 + results["cached_tokens"] * 0.075
                + results["completion_tokens"] * 0.60) / 1e6
    assert results["cost_usd"].to_list() == pytest.approx(expected.to_list(), rel=1e-6)
    pc = json.loads((Path(summary.out_dir) / "summary.json").read_text())["prompt_cache"]
    assert pc["cached_tokens"] == sum(cached) and pc["hit_share"] == pytest.approx(
        sum(cached) / results["prompt_tokens"].sum(), abs=1e-4)
    assert pc["hit_share"] > 0.7 and pc["saved_usd"] == pytest.approx(sum(cached) * 0.075 / 1e6, rel=1e-3)
    assert pc["run_saved_usd"] == pytest.approx(pc["saved_usd"], rel=1e-3)
    # The same figures in the history line, the metrics file and the report.
    last = json.loads((Path(summary.out_dir) / "history.jsonl").read_text().splitlines()[-1])
    assert last["cached_tokens"] == sum(cached) and last["cache_saved_usd"] == pytest.approx(pc["saved_usd"], rel=1e-3)
    prom = (tmp_path / "job.prom").read_text()
    assert f'pipeline_tokens_total{{job="{summary.out_dir}",kind="cached"}} {float(sum(cached))}' in prom
    assert "pipeline_prompt_cache_saved_usd_total" in prom
    done = cli_in_process("report", summary.out_dir, "-o", str(tmp_path / "report.html"))
    if done.returncode == 0:  # the report extra (Altair) is installed
        page = (tmp_path / "report.html").read_text()
        assert "prompt tokens read from the provider&#x27;s cache" in page or "provider's cache" in page
        assert f"{pc['hit_share']:.0%}" in page


def test_anthropic_models_cache_only_what_is_marked(tmp_path: Path) -> None:
    _, marked = run(tmp_path / "auto", "anthropic/claude-3.5-sonnet")
    cached = marked.sort("rid")["cached_tokens"].to_list()
    assert cached[0] == 0 and all(c > 1024 for c in cached[1:])
    _, unmarked = run(tmp_path / "off", "anthropic/claude-3.5-sonnet", cache="off")
    assert unmarked["cached_tokens"].sum() == 0
    assert marked["cost_usd"].sum() < 0.5 * unmarked["cost_usd"].sum()
    # The same answers either way: the hints change neither the question nor its key.
    same = marked.select("rid", "request_key", "content").sort("rid")
    assert same.equals(unmarked.select("rid", "request_key", "content").sort("rid"))
