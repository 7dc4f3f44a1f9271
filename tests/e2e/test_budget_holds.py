"""A budget that holds against the bill: an endpoint charging 10x the price table is reserved for at its own
rate once its first answers are in, and the next run starts from what this one learned."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.errors import EXIT_STOPPED
from pipeline.send.budget import MARKUP_META
from tests.conftest import job

CAP = 0.05
# gpt-4o-mini's table price is $0.15 / $0.60 per million; this endpoint bills ten times that in usage.cost.
DEAR = {"openai/gpt-4o-mini": {"input_per_m": 1.5, "output_per_m": 6.0}}


def dear_job(tmp_path: Path, concurrency: int, cap: float = CAP, rows: int = 600) -> dict[str, Any]:
    return job(tmp_path, rows, sim={"prices": DEAR, "cached_tokens_ratio": 0.0},
               endpoint={"model": "openai/gpt-4o-mini"}, budget={"max_cost_usd": cap},
               params={"temperature": 0, "max_tokens": 40},  # a worst case of ~$0.00003 a request at the table
               limits={"max_concurrency": concurrency})


def spent(out: Path) -> tuple[float, float]:
    """(the job's spend, the dearest answer) as the store recorded them."""
    with sqlite3.connect(out / "store.sqlite") as db:
        total, dearest = db.execute("SELECT sum(cost_usd), max(cost_usd) FROM responses").fetchone()
    return float(total), float(dearest)


@pytest.mark.parametrize("cap", [0.05, 0.01, 0.01003, 0.01006, 0.01009])
def test_one_at_a_time_never_spends_over_the_cap(tmp_path: Path, cap: float) -> None:
    summary = pipeline.run(dear_job(tmp_path, 1, cap=cap), quiet=True)
    assert summary.exit_code == EXIT_STOPPED and summary.stopped == "budget"
    total, dearest = spent(Path(summary.out_dir))
    # Each answer costs several times the table's worst case for it, so reserving at the table alone ends
    # over the cap (at most caps); reserving at the learned rate stops with nothing in flight, at or under it.
    assert cap - 20 * dearest < total <= cap
    assert summary.cost_usd == pytest.approx(total, abs=1e-6)


def test_many_in_flight_overshoot_by_at_most_what_is_in_flight(tmp_path: Path) -> None:
    summary = pipeline.run(dear_job(tmp_path, 8), quiet=True)
    assert summary.exit_code == EXIT_STOPPED and summary.stopped == "budget"
    total, dearest = spent(Path(summary.out_dir))
    assert total <= CAP + 8 * dearest
    results = pl.read_parquet(Path(summary.out_dir) / "results.parquet")
    assert results.height > 100  # it stopped near the cap, not at the first answer


def test_the_next_run_reserves_at_the_learned_rate_from_its_first_request(tmp_path: Path) -> None:
    first = pipeline.run(dear_job(tmp_path, 1), quiet=True)
    out = Path(first.out_dir)
    with sqlite3.connect(out / "store.sqlite") as db:
        reported, table = map(float, db.execute("SELECT value FROM meta WHERE name = ?",
                                                (MARKUP_META,)).fetchone()[0].split())
    assert reported / table == pytest.approx(10, rel=0.05)
    before, _ = spent(out)
    # Raised by a little: 8 requests in flight at the table's price would fit, at the endpoint's they do not.
    second = pipeline.run(dear_job(tmp_path, 8, cap=before + 0.002), quiet=True)
    assert second.exit_code == EXIT_STOPPED
    after, _ = spent(out)
    assert after <= before + 0.002
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["exit_code"] for h in history] == [EXIT_STOPPED, EXIT_STOPPED]
