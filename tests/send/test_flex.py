"""OpenAI Flex processing: its "429 Resource Unavailable" is retried with backoff (not a quota stop, not a
client-wide rate-limit pause), and a Flex run is charged the Flex price."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline.errors import CreditsError, RateLimited, TransientError
from pipeline.send.classify import classify
from pipeline.send.transport import Reply
from tests.conftest import job

# The shape OpenAI uses for its own 429s, with Flex's "resource unavailable" code.
FLEX_429 = (b'{"error": {"message": "Resource unavailable: Flex processing has no capacity right now. Retry later.",'
            b' "type": "server_error", "param": null, "code": "resource_unavailable"}}')


def test_resource_unavailable_is_transient_not_quota_or_rate() -> None:
    with pytest.raises(TransientError) as caught:
        classify(Reply(429, {}, FLEX_429, 0.1))
    assert not isinstance(caught.value, (RateLimited, CreditsError)) and caught.value.code == "resource_unavailable"
    with pytest.raises(RateLimited):  # an ordinary 429 still slows the whole client down
        classify(Reply(429, {}, b'{"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}', 0.1))


@pytest.mark.parametrize("flavor", ["openai", "openrouter"])
def test_a_flex_run_retries_unavailable_capacity_and_pays_the_flex_price(tmp_path: Path, flavor: str) -> None:
    cfg = job(tmp_path, 12, sim={"flavor": flavor, "cached_tokens_ratio": 0.0,
                                 "fault_plan": [{"requests": "1-4", "fault": "429_flex"}]},
              endpoint={"model": "openai/gpt-5-mini"}, params={"service_tier": "flex", "max_tokens": 200},
              limits={"max_concurrency": 2})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 12
    assert summary.retries == {"transient": 4}
    results = pl.read_parquet(Path(summary.out_dir) / "results.parquet")
    # gpt-5-mini's Flex rates: $0.125 in, $1 out per million (half the default tier), from both sides.
    expected = (results["prompt_tokens"] * 0.125 + results["completion_tokens"] * 1.0) / 1e6
    assert results["cost_usd"].to_list() == pytest.approx(expected.to_list(), rel=1e-6)
