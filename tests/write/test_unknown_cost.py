"""A model with no known price whose server reports no usage.cost (issue 19 item 15): its answers'
cost_usd is null (unknown), not 0.0 (free); with a usage.cost, or a price, the figure is written."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import pipeline
from tests.conftest import job


@pytest.mark.parametrize(("model", "flavor", "known"), [
    ("acme/unpriced-model-x", "openai", False),      # no price, no usage.cost: unknown
    ("acme/unpriced-model-x", "openrouter", True),   # OpenRouter reports usage.cost
    ("openai/gpt-4-turbo", "openai", True),          # the price table knows the model
])
def test_cost_is_null_only_when_nothing_says_what_it_was(tmp_path: Path, model: str, flavor: str,
                                                         known: bool) -> None:
    summary = pipeline.run(job(tmp_path, 3, endpoint={"model": model}, sim={"flavor": flavor}))
    assert summary.exit_code == 0
    costs = pl.read_parquet(tmp_path / "out" / "results.parquet")["cost_usd"]
    assert costs.dtype == pl.Float64
    if known:
        assert costs.null_count() == 0 and (costs > 0).all()
    else:
        assert costs.null_count() == 3
