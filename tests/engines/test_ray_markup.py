"""A Ray budget that holds against the bill (issue 21 on run.engine: ray): the job's limiter actor learns
what the endpoint charges over the price table (usage.cost) from every worker's answers, keeps it in
`_journal/_budget.json`, and a resumed run reserves at that rate from its very first request."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

import pipeline
from pipeline.engines.ray.budget import budget_uri
from pipeline.errors import EXIT_STOPPED
from tests.conftest import job
from tests.e2e.test_budget_holds import DEAR


def _dear(tmp_path: Path, cap: float, concurrency: int) -> dict[str, Any]:
    return job(tmp_path, 300, sim={"prices": DEAR, "cached_tokens_ratio": 0.0}, endpoint={"model": "openai/gpt-4o-mini"},
               budget={"max_cost_usd": cap}, params={"temperature": 0, "max_tokens": 40},
               limits={"max_concurrency": concurrency}, input={"batch_size": 50},
               run={"engine": "ray", "workers": 2})


def _billed(out: Path) -> tuple[float, float]:
    """(the job's spend, the dearest answer) as the endpoint billed them (the journal's records)."""
    costs = {r["key"]: r["cost_usd"] for seg in (out / "_journal").glob("*/*.parquet")
             for r in pq.read_table(seg, columns=["key", "cost_usd"]).to_pylist()}
    return sum(costs.values()), max(costs.values())


def test_a_resumed_ray_run_reserves_at_the_learned_markup_from_its_first_request(tmp_path: Path, ray_local: Any) -> None:
    first = pipeline.run(_dear(tmp_path, 0.01, 2), quiet=True)
    out = Path(first.out_dir)
    assert first.exit_code == EXIT_STOPPED and first.stopped == "budget", first
    spent, dearest = _billed(out)
    assert spent <= 0.01 + 2 * dearest  # the first requests went at the table's price: at most those in flight over
    kept = orjson.loads(Path(budget_uri(str(out))).read_bytes())
    reported, table = map(float, kept["markup"].split())
    assert reported / table > 9.5 and kept["exact"] and abs(kept["spent"] - spent) < 1e-9
    # Raised by a little: 8 requests in flight at the table's price would fit, at the endpoint's they do not.
    cap = spent + 3 * dearest
    second = pipeline.run(_dear(tmp_path, cap, 8), quiet=True)
    assert second.exit_code == EXIT_STOPPED and second.stopped == "budget", second
    after, _ = _billed(out)
    assert spent < after <= cap + 1e-12 and abs(second.cost_usd - after) < 2e-6
