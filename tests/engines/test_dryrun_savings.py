"""The dry run on the price levers: the shared prefix and the provider's minimum, the predicted cached share
and cost, the row-before-shared-text warning, batch prices and window, and the modes side by side."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.engines.estimate import dry_run
from tests.support import cli_in_process

SHARED = "You label product reviews by sentiment. " + " ".join(
    f"Example {i}: 'the item number {i} was as described' -> positive." for i in range(110)) + "\n\nReview: "


def config(tmp_path: Path, user: str = SHARED + "{{ text }}", rows: int = 100, **sections: Any) -> Path:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"rid": f"r{i}", "text": f"review {i} " * 20}) + "\n" for i in range(rows)))
    cfg: dict[str, Any] = {"input": {"path": str(data), "id_column": "rid"},
                           "endpoint": {"base_url": "simulator", "model": "openai/gpt-4o-mini"},
                           "prompt": {"user": user}, "params": {"max_tokens": 20},
                           "limits": {"max_concurrency": 10}, "output": {"dir": str(tmp_path / "out")}}
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))
    return path


def estimate_json(path: Path, *args: str) -> dict[str, Any]:
    done = cli_in_process("run", str(path), "--dry-run", "--json", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_shared_prefix_minimum_and_predicted_share(tmp_path: Path) -> None:
    doc = estimate_json(config(tmp_path))
    pc = doc["prompt_cache"]
    assert pc["style"] == "automatic" and pc["provider_minimum"] == 1024
    assert 1500 < pc["shared_prefix_tokens"] < doc["prompt_tokens"]["total"] / 100
    assert pc["cacheable_per_request"] == 1024 + (pc["shared_prefix_tokens"] - 1024) // 128 * 128
    # The first 10 requests (max_concurrency) find the cache cold; the other 90 read it.
    assert pc["predicted_cached_tokens"] == 90 * pc["cacheable_per_request"]
    assert pc["predicted_share"] == pytest.approx(pc["predicted_cached_tokens"] / doc["prompt_tokens"]["total"],
                                                  abs=1e-4)
    saved = pc["predicted_cached_tokens"] * (0.15 - 0.075) / 1e6
    assert pc["predicted_cost_usd"] == pytest.approx(doc["cost_usd"]["min"] - saved, abs=1e-6)
    assert doc["cache_warnings"] == []


def test_a_short_prefix_is_said_to_be_below_the_minimum(tmp_path: Path) -> None:
    out = io.StringIO()
    dry_run(load_config(config(tmp_path, user="Label: {{ text }}")), out)
    assert "shared prefix" in out.getvalue() and "below it: nothing will be cached" in out.getvalue()


def test_row_content_before_shared_text_is_warned_about(tmp_path: Path) -> None:
    path = config(tmp_path, user="Review: {{ text }}\n\n" + SHARED)
    doc = estimate_json(path)
    assert len(doc["cache_warnings"]) == 1 and "prompt.user puts row content before" in doc["cache_warnings"][0]
    assert doc["prompt_cache"]["cacheable_per_request"] == 0 and doc["prompt_cache"]["predicted_cached_tokens"] == 0
    done = cli_in_process("run", str(path), "--dry-run")
    assert done.returncode == 0 and "warning: prompt.user puts row content before" in done.stdout


def test_anthropic_needs_the_mark(tmp_path: Path) -> None:
    auto = estimate_json(config(tmp_path, endpoint={"model": "anthropic/claude-3.5-sonnet"}))["prompt_cache"]
    assert auto["style"] == "breakpoint" and auto["predicted_written_tokens"] == auto["cacheable_per_request"]
    assert auto["predicted_cached_tokens"] == 99 * auto["cacheable_per_request"] > 0
    off = estimate_json(config(tmp_path, endpoint={"model": "anthropic/claude-3.5-sonnet"},
                               prompt={"cache": "off"}))["prompt_cache"]
    assert off["predicted_cached_tokens"] == 0


def test_batch_mode_is_priced_at_batch_rates_within_the_batch_window(tmp_path: Path) -> None:
    sync = estimate_json(config(tmp_path))
    batch = estimate_json(config(tmp_path, run={"mode": "batch"}))
    assert batch["cost_usd"]["min"] == pytest.approx(sync["cost_usd"]["min"] / 2, rel=1e-4)
    assert batch["cost_usd"]["max"] == pytest.approx(sync["cost_usd"]["max"] / 2, rel=1e-4)
    assert batch["prices"]["openai/gpt-4o-mini"]["input_per_m"] == 0.075
    assert batch["time_s"]["max"] == 24 * 3600 and batch["time_s"]["slowest"] == "batch window"
    done = cli_in_process("run", str(config(tmp_path, run={"mode": "batch"})), "--dry-run")
    assert done.returncode == 0 and "24 h window" in done.stdout and "requests/min" not in done.stdout


def test_compare_puts_the_modes_side_by_side(tmp_path: Path) -> None:
    doc = estimate_json(config(tmp_path), "--compare")
    modes = {m["mode"]: m for m in doc["modes"]}
    assert list(modes) == ["sync", "sync, service_tier flex", "batch"]
    sync, flex, batch = (modes[m]["cost_usd"] for m in modes)
    assert batch["min"] == pytest.approx(sync["min"] / 2, rel=1e-4) and flex["min"] == pytest.approx(batch["min"])
    assert batch["with_prompt_cache"] < batch["min"] < sync["with_prompt_cache"] < sync["min"]
    assert modes["batch"]["time_s"][1] == 24 * 3600 > modes["sync"]["time_s"][1]
    done = cli_in_process("run", str(config(tmp_path)), "--dry-run", "--compare")
    assert done.returncode == 0 and "Modes side by side" in done.stdout
    done = cli_in_process("run", str(config(tmp_path)), "--compare")
    assert done.returncode == 2 and "--compare goes with --dry-run" in done.stderr
