"""A Ray budget that holds against the bill (issue 21 on run.engine: ray): the job's limiter actor learns
what the endpoint charges over the price table (usage.cost) from every worker's answers, with or without a
cap, keeps it in `_journal/_budget.json`, and a resumed run reserves at that rate from its very first
request."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

import pipeline
from pipeline.engines.ray.budget import budget_uri, spent_so_far, write_spent
from pipeline.errors import EXIT_STOPPED
from tests.conftest import job, write_rows
from tests.e2e.test_budget_holds import DEAR


def _dear(tmp_path: Path, cap: float | None, concurrency: int) -> dict[str, Any]:
    return job(tmp_path, 100, sim={"prices": DEAR, "cached_tokens_ratio": 0.0}, endpoint={"model": "openai/gpt-4o-mini"},
               budget={"max_cost_usd": cap}, params={"temperature": 0, "max_tokens": 40},
               limits={"max_concurrency": concurrency}, input={"batch_size": 50},
               run={"engine": "ray", "workers": 2})


def _billed(out: Path) -> tuple[float, float]:
    """(the job's spend, the dearest answer) as the endpoint billed them (the journal's records)."""
    costs = {r["key"]: r["cost_usd"] for seg in (out / "_journal").glob("*/*.parquet")
             for r in pq.read_table(seg, columns=["key", "cost_usd"]).to_pylist()}
    return sum(costs.values()), max(costs.values())


def _kept(out: Path) -> tuple[float, float, dict[str, Any]]:
    """(markup learned, spent, the whole file) from _budget.json."""
    kept = orjson.loads(Path(budget_uri(str(out))).read_bytes())
    reported, table = map(float, kept["markup"].split())
    return reported / table, kept["spent"], kept


def test_a_resumed_ray_run_reserves_at_the_learned_markup_from_its_first_request(tmp_path: Path, ray_local: Any) -> None:
    # A first night without a cap: nothing is reserved, yet the actor learns the endpoint's rate and keeps it.
    first = pipeline.run(_dear(tmp_path, None, 4), quiet=True)
    out = Path(first.out_dir)
    assert first.exit_code == 0 and first.succeeded == 100, first
    spent, dearest = _billed(out)
    markup, kept_spent, kept = _kept(out)
    assert markup > 9.5 and kept["exact"] and abs(kept_spent - spent) < 1e-6
    # The input grows; the next run has a cap raised by a little over what was spent: 16 requests in flight
    # at the table's price would fit, at the endpoint's they do not.
    write_rows(tmp_path / "in.jsonl", 300)
    cap = spent + 2.5 * dearest
    second = pipeline.run(_dear(tmp_path, cap, 16), quiet=True)
    assert second.exit_code == EXIT_STOPPED and second.stopped == "budget", second
    after, _ = _billed(out)
    assert spent < after <= cap + 1e-12 and abs(second.cost_usd - after) < 2e-6
    markup, kept_spent, _ = _kept(out)
    assert markup > 9.5 and abs(kept_spent - after) < 1e-9  # the capped run's exact figure, with what it learned


def test_a_resumed_budget_starts_from_the_larger_of_the_budget_file_and_the_last_summary(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert spent_so_far(root, None, 0.25) == 0.25  # no budget file yet: the summary's figure
    write_spent(root, None, 0.5, exact=True)
    assert spent_so_far(root, None, 0.25) == 0.5  # a driver that died after its last summary: the file's ceiling
    assert spent_so_far(root, None, 1.5) == 1.5  # a later run without a cap spent more than the file says
