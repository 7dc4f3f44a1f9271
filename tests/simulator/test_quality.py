"""The simulator as a model of some accuracy: a truth derived from the row, per-model accuracy, calibrated
logprobs (a weaker model errs more and is less sure when it errs), n samples. Over loopback HTTP."""
from __future__ import annotations

import asyncio
import functools
from typing import Any

import aiohttp
import orjson

from pipeline.send.confidence import choice_fields, logprob_confidence
from pipeline_simulator import SimConfig, Simulator
from pipeline_simulator.judge import truth_of
from tests.simclient import serve

VALUES = ["positive", "negative", "neutral"]
SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": VALUES},
                                           "spam": {"type": "boolean"}},
          "required": ["sentiment", "spam"], "additionalProperties": False}
ROWS = 400


def ask(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "Label it."}, {"role": "user", "content": text}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": SCHEMA, "strict": True}},
            **extra}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{url}/chat/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def answers(model: str, rows: int = ROWS, **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    cfg = SimConfig(flavor="openai", accuracy={"weak": 0.8, "strong": 0.95})

    async def run(_sim: Simulator, url: str, session: aiohttp.ClientSession) -> list[tuple[str, dict[str, Any]]]:
        texts = [f"review {i}: the parcel came {'late' if i % 3 else 'early'}" for i in range(rows)]
        bodies = await asyncio.gather(*(post(session, url, ask(model, t, **extra)) for t in texts))
        return list(zip(texts, bodies))
    return serve(cfg, run)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=4)
def scored(model: str) -> list[tuple[float, bool]]:
    """(confidence read from the logprobs, right?) per field of every row."""
    fields = choice_fields(SCHEMA)
    out = []
    for text, body in answers(model, logprobs=True, top_logprobs=5):
        choice = body["choices"][0]
        value = orjson.loads(choice["message"]["content"])
        conf = logprob_confidence(choice["logprobs"]["content"], value, fields)
        for name, values in fields.items():
            out.append((conf[name], value[name] == truth_of(text, name, values)))
    return out


def test_a_weaker_model_errs_more_and_is_less_sure_when_it_errs() -> None:
    weak, strong = scored("weak"), scored("strong")
    acc = {m: sum(ok for _, ok in s) / len(s) for m, s in (("weak", weak), ("strong", strong))}
    assert 0.72 < acc["weak"] < 0.88 and 0.9 < acc["strong"] < 0.99
    sure_wrong = sum(c for c, ok in weak if not ok) / sum(1 for _, ok in weak if not ok)
    sure_right = sum(c for c, ok in weak if ok) / sum(1 for _, ok in weak if ok)
    assert sure_wrong < sure_right - 0.2


def test_logprob_confidence_is_calibrated() -> None:
    pairs = scored("weak") + scored("strong")
    for lo, hi in ((0.0, 0.7), (0.7, 0.95), (0.95, 1.01)):
        bin_ = [ok for c, ok in pairs if lo <= c < hi]
        assert len(bin_) > 30, (lo, hi, len(bin_))
        mean_conf = sum(c for c, _ in pairs if lo <= c < hi) / len(bin_)
        assert abs(sum(bin_) / len(bin_) - mean_conf) < 0.12, (lo, hi)


def test_the_same_request_gets_the_same_answer_and_the_truth_is_the_rows() -> None:
    first, again = answers("weak", 40), answers("weak", 40)
    assert [b["choices"][0]["message"]["content"] for _, b in first] == \
        [b["choices"][0]["message"]["content"] for _, b in again]
    assert "logprobs" in first[0][1]["choices"][0] and first[0][1]["choices"][0]["logprobs"] is None
    perfect = SimConfig(flavor="openai", default_accuracy=1.0)

    async def run(_sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        for i in range(30):
            body = await post(session, url, ask(f"any-{i % 3}", f"text {i}"))
            value = orjson.loads(body["choices"][0]["message"]["content"])
            assert value["sentiment"] == truth_of(f"text {i}", "sentiment", VALUES)
    serve(perfect, run)


def test_n_samples_are_drawn_at_temperature_and_counted_in_usage() -> None:
    [(_, one)] = answers("weak", 1, n=1, temperature=1.0)
    [(_, body)] = answers("weak", 1, n=7, temperature=1.0)
    assert [c["index"] for c in body["choices"]] == list(range(7))
    assert body["usage"]["completion_tokens"] > 5 * one["usage"]["completion_tokens"]
    greedy = answers("weak", 20, n=3)
    for _, b in greedy:  # without a temperature every sample is the most likely answer
        assert len({c["message"]["content"] for c in b["choices"]}) == 1
    sampled = answers("weak", 40, n=9, temperature=1.0)
    assert any(len({c["message"]["content"] for c in b["choices"]}) > 1 for _, b in sampled)


def test_a_streamed_answer_carries_the_same_logprobs_one_token_per_chunk() -> None:
    """As OpenAI streams them: the role chunk an empty `logprobs.content`, each content chunk the one token
    it writes, the final chunk null; put together they are the non-streamed answer's, and so is the
    confidence read from them."""
    fields = choice_fields(SCHEMA)

    async def run(_sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        for i in range(12):
            body = ask("weak", f"review {i}: it broke", logprobs=True, top_logprobs=3)
            whole = (await post(session, url, body))["choices"][0]
            async with session.post(f"{url}/chat/completions", json={**body, "stream": True},
                                    headers={"Authorization": "Bearer k"}) as r:
                text = (await r.read()).decode()
            chunks = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            assert choices[0]["logprobs"] == {"content": [], "refusal": None}
            assert choices[-1]["finish_reason"] == "stop" and choices[-1]["logprobs"] is None
            tokens = []
            for choice in choices[1:-1]:
                [token] = choice["logprobs"]["content"]
                assert choice["delta"] == {"content": token["token"]} and choice["logprobs"]["refusal"] is None
                tokens.append(token)
            assert tokens == whole["logprobs"]["content"]
            content = "".join(t["token"] for t in tokens)
            assert content == whole["message"]["content"]
            value = orjson.loads(content)
            assert logprob_confidence(tokens, value, fields) == \
                logprob_confidence(whole["logprobs"]["content"], value, fields)
    serve(SimConfig(flavor="openai", accuracy={"weak": 0.8}), run)


def test_n_streamed_samples_are_the_whole_answers_samples_each_under_its_index() -> None:
    async def run(_sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        varied = 0
        for i in range(8):
            body = ask("weak", f"review {i}: it broke twice", n=5, temperature=1.0)
            whole = [c["message"]["content"] for c in (await post(session, url, body))["choices"]]
            async with session.post(f"{url}/chat/completions", json={**body, "stream": True},
                                    headers={"Authorization": "Bearer k"}) as r:
                text = (await r.read()).decode()
            chunks = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
            choices = [ch for c in chunks for ch in c["choices"]]
            indexes = [ch["index"] for ch in choices]
            assert sorted(set(indexes)) == list(range(5)) and indexes != sorted(indexes)  # interleaved
            assert sorted(ch["index"] for ch in choices if ch["finish_reason"] == "stop") == list(range(5))
            assert ["".join(ch["delta"].get("content") or "" for ch in choices if ch["index"] == k)
                    for k in range(5)] == whole
            varied += len(set(whole)) > 1
        assert varied > 0  # the samples are draws, and each keeps its own index
    serve(SimConfig(flavor="openai", accuracy={"weak": 0.6}), run)
