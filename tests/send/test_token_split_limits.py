"""Input and output tokens per minute (Anthropic's ITPM / OTPM, Databricks): output reserved at max_tokens
and refunded on the answer, cached reads left out where the provider exempts them. Virtual clock."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import LimitsConfig, load_config
from pipeline.errors import PermanentError
from pipeline.prepare.prompts import RenderedRow
from pipeline.prepare.request import RequestBuilder
from pipeline.prepare.tokens import TokenCounter
from pipeline.send.buckets import Bucket
from pipeline.send.dispatch import Dispatcher
from pipeline.send.limits import Limits
from tests.conftest import job
from tests.fakes import MemoryAnswers, Scripted
from tests.send.test_limits import max_in_window
from tests.vclock import run_virtual

MAX_TOKENS = 200


def split_limits(**kw: Any) -> Limits:
    return Limits(LimitsConfig(**{"requests_per_minute": None, "max_concurrency": 1000, "burst_s": 1.0, **kw}))


def run_requests(lim: Limits, n: int, prompt: int, used_output: int | None) -> list[tuple[float, int, int]]:
    """(send time, input, output used) of n requests that each reserve MAX_TOKENS of output."""
    async def scenario() -> list[tuple[float, int, int]]:
        loop = asyncio.get_running_loop()
        sent: list[tuple[float, int, int]] = []

        async def one() -> None:
            async with lim.slot(prompt + MAX_TOKENS, input_tokens=prompt, output_tokens=MAX_TOKENS) as permit:
                sent.append((loop.time(), prompt, used_output if used_output is not None else MAX_TOKENS))
                await asyncio.sleep(0.5)
                if used_output is not None:
                    permit.settle(prompt + used_output, prompt, used_output)

        await asyncio.gather(*(one() for _ in range(n)))
        return sorted(sent)
    return run_virtual(scenario())


def test_output_is_reserved_at_max_tokens_and_refunded_on_the_answer() -> None:
    reserved = run_requests(split_limits(output_tokens_per_minute=6000), 120, 100, None)
    refunded = run_requests(split_limits(output_tokens_per_minute=6000), 120, 100, 20)
    for sent in (reserved, refunded):
        times, used = [t for t, _, _ in sent], [o for _, _, o in sent]
        assert max_in_window(times, 60.0, [float(u) for u in used]) <= 6000  # what the server counts
    # Reserved in full, 120 x 200 tokens take about four minutes at 6,000 a minute; refunded to the 20 used,
    # the same requests fit in well under one.
    assert reserved[-1][0] > 3.5 * 60
    assert refunded[-1][0] < 60


def test_input_tokens_per_minute_is_a_hard_ceiling() -> None:
    sent = run_requests(split_limits(input_tokens_per_minute=10_000), 100, 500, 20)  # 50k input tokens
    times, inputs = [t for t, _, _ in sent], [float(i) for _, i, _ in sent]
    assert max_in_window(times, 60.0, inputs) <= 10_000
    assert times[-1] > 3.8 * 60


@pytest.mark.parametrize(("key", "kw"), [("input_tokens_per_minute", {"input_tokens": 2000}),
                                          ("output_tokens_per_minute", {"output_tokens": 2000})])
def test_a_request_over_a_minute_of_either_is_permanent(key: str, kw: dict[str, float]) -> None:
    with pytest.raises(PermanentError, match=key):
        split_limits(**{key: 1000}).slot(2100, **kw)


class Counted(Bucket):
    """A bucket that remembers what was taken and adjusted (the bucket's level also leaks with time)."""

    def __init__(self, per_minute: float) -> None:
        super().__init__(per_minute, 1.0)
        self.taken: list[float] = []
        self.net = 0.0

    async def take(self, amount: float) -> None:
        self.taken.append(amount)
        self.net += amount
        await super().take(amount)

    def adjust(self, delta: float) -> None:
        self.net += delta
        super().adjust(delta)


def answering(prompt: int, cached: int, completion: int) -> Scripted:
    body = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "prompt_tokens_details": {"cached_tokens": cached}}}
    return Scripted(lambda _body: (200, body), latency_s=0.1)


@pytest.mark.parametrize(("model", "counted"), [("anthropic/claude-3.5-sonnet", 100), ("openai/gpt-4o-mini", 1000)])
def test_cached_reads_leave_input_tokens_per_minute_where_the_provider_exempts_them(
        tmp_path: Path, model: str, counted: int) -> None:
    data = job(tmp_path, 1, limits={"requests_per_minute": None, "input_tokens_per_minute": 50_000,
                                    "output_tokens_per_minute": 50_000})
    data["endpoint"] = {"base_url": "http://scripted.invalid/v1", "model": model}
    data["prices"] = {model: {"input_per_m": 1, "output_per_m": 1}}
    del data["structured"]
    cfg = load_config(data)

    async def scenario() -> tuple[Counted, Counted]:
        lim = Limits(cfg.limits)
        lim.input_tokens, lim.output_tokens = Counted(50_000), Counted(50_000)
        d = Dispatcher(cfg, answering(1000, 900, 5), MemoryAnswers(), lim, None, rng=random.Random(1))
        builder = RequestBuilder(cfg.endpoint.base_url, None, TokenCounter(model))
        body = {"model": model, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "x " * 400}]}
        await d.submit(builder.build(RenderedRow(body, MAX_TOKENS)))
        return lim.input_tokens, lim.output_tokens

    inp, out = run_virtual(scenario())
    assert out.taken == [MAX_TOKENS]
    used_in, used_out = inp.net, out.net
    assert used_in == pytest.approx(counted, abs=2)  # Anthropic: 1,000 prompt tokens less 900 cached reads
    assert used_out == pytest.approx(5, abs=2)  # 200 reserved, 195 refunded
