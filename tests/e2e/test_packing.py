"""Several rows per request (`prompt.rows_per_request`, issue 21): packs end to end over loopback HTTP.

A hostile endpoint of the test's own answers a pack badly on purpose; the built-in simulator answers
packs row by row (the same labels as one by one); resume, dedup, cache.dir, nightly growth and the
refused combinations."""
from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web

import pipeline
from pipeline.errors import ConfigError
from tests.conftest import job, write_rows
from tests.support import assert_each_id_once, outputs


def _right(text: str) -> dict[str, Any]:
    """The right answer for a row of conftest.write_rows: positive, its number mod 5 plus 1."""
    n = int(re.search(r"review number (\d+)", text).group(1))  # type: ignore[union-attr]
    return {"sentiment": "positive", "score": n % 5 + 1}


class Hostile:
    """A chat-completions endpoint on 127.0.0.1 (its own thread and loop) that answers every pack of
    several rows with ids 2 and 3 dropped, id 4 answered twice with two different answers, and an answer
    under id 99, which no pack asked; a row alone is answered right. `asked` holds each request's rows."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.billed = {"prompt_tokens": 0, "completion_tokens": 0}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        rows = json.loads(body["messages"][-1]["content"])["rows"]
        self.asked.append([r["input"] for r in rows])
        answers = [{"id": r["id"], "answer": _right(r["input"])} for r in rows]
        if len(rows) > 1:
            answers = [a for a in answers if a["id"] not in ("2", "3", "4")]
            answers += [{"id": "4", "answer": {"sentiment": "negative", "score": 1}},
                        {"id": "99", "answer": {"sentiment": "mixed", "score": 3}},
                        {"id": "4", "answer": {"sentiment": "negative", "score": 2}}]
        usage = {"prompt_tokens": 100 * len(rows) + 50, "completion_tokens": 20 * len(rows)}
        for k, v in usage.items():
            self.billed[k] += v
        return web.json_response({
            "id": f"chatcmpl-{len(self.asked)}", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps({"answers": answers})}}],
            "usage": {**usage, "total_tokens": sum(usage.values())}})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Hostile:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_bad_packed_answer_asks_again_exactly_the_rows_it_failed_and_misassigns_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_KEY", "sk-test")
    with Hostile() as server:
        cfg = job(tmp_path, rows=5, endpoint={"base_url": server.url, "model": "openai/gpt-4o-mini",
                                              "api_key_env": "HOSTILE_KEY"},
                  prompt={"rows_per_request": 5})
        summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 5, summary
    texts = [f"review number {i}: works fine, arrived late" for i in range(5)]  # "Review: " travels once
    assert server.asked[0] == texts  # one pack of all five rows, in input order
    # Exactly the dropped (ids 2, 3) and the twice-answered (id 4) rows again, each alone; nothing else.
    assert sorted(server.asked[1:]) == [[texts[1]], [texts[2]], [texts[3]]]
    results, failures = outputs(tmp_path / "out")
    assert failures.height == 0
    for row in results.iter_rows(named=True):
        n = int(row["rid"][1:])
        assert row["output"] == {**_right(texts[n]), "tags": None}, row  # never the duplicates' or id 99's
    # The pack's bill and the three re-asks' bills, apportioned: the rows add up to what was billed.
    assert results["prompt_tokens"].sum() == server.billed["prompt_tokens"]
    assert results["completion_tokens"].sum() == server.billed["completion_tokens"]
    assert (results["attempts"] > 1).sum() == 3  # the three rows asked twice say so


def _labels(out: Path) -> dict[str, Any]:
    results, failures = outputs(out)
    assert failures.height == 0
    return {r["rid"]: r["output"] for r in results.iter_rows(named=True)}


def test_packed_rows_get_the_same_labels_columns_and_types_as_one_by_one(tmp_path: Path) -> None:
    single = job(tmp_path, rows=40, output={"dir": str(tmp_path / "one")})
    packed = job(tmp_path, rows=40, output={"dir": str(tmp_path / "packed")}, prompt={"rows_per_request": 10})
    one = pipeline.run(single, quiet=True)
    ten = pipeline.run(packed, quiet=True)
    assert one.exit_code == ten.exit_code == 0
    assert one.requests_sent == 40 and ten.requests_sent == 4
    assert _labels(tmp_path / "one") == _labels(tmp_path / "packed")
    a, _ = outputs(tmp_path / "one")
    b, _ = outputs(tmp_path / "packed")
    assert a.schema == b.schema
    # Apportioned, each row's cost is a share of its pack's: the total is the packs' bill.
    assert 0 < b["cost_usd"].sum() < a["cost_usd"].sum()
    assert b["cost_usd"].sum() == pytest.approx(ten.cost_usd)


def test_resume_dedup_cache_and_a_grown_input_with_packs(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "in.jsonl", 30, dup_every=2)  # 15 distinct texts, each twice
    cache = str(tmp_path / "cache")
    cfg = job(tmp_path, prompt={"rows_per_request": 4}, cache={"dir": cache})
    first = pipeline.run(cfg, quiet=True)
    assert first.exit_code == 0 and first.succeeded == 30 and first.requests_sent == 4  # 15 rows: 4+4+4+3
    again = pipeline.run(cfg, quiet=True)
    assert again.requests_sent == 0 and again.succeeded == 30
    # A second job over the same rows finds every answer in the shared cache.
    other = job(tmp_path, prompt={"rows_per_request": 8}, cache={"dir": cache}, output={"dir": str(tmp_path / "o2")})
    hits = pipeline.run(other, quiet=True)
    assert hits.requests_sent == 0 and hits.succeeded == 30 and hits.cache_hits == 15
    # Nightly: grown input, only the new rows are asked (K may change: a row's key does not depend on it).
    write_rows(data, 40)
    grown = pipeline.run({**cfg, "prompt": {**cfg["prompt"], "rows_per_request": 6}}, quiet=True)
    assert grown.exit_code == 0 and grown.succeeded == 40
    assert grown.requests_sent == 5  # texts 15..39 are new (0..14 were asked): 25 rows, 6+6+6+6+1
    assert_each_id_once(tmp_path / "out", 40)
    # One by one is another job: refused, naming the key.
    with pytest.raises(Exception, match="prompt.rows_per_request"):
        pipeline.run({**cfg, "prompt": {**cfg["prompt"], "rows_per_request": 1}}, quiet=True)


@pytest.mark.parametrize("change, named", [
    ({"structured": None}, "structured.schema"),
    ({"prompt": {"images": ["photo"]}}, "prompt.images"),
])
def test_combinations_packs_cannot_serve_are_config_errors(tmp_path: Path, change: dict[str, Any],
                                                           named: str) -> None:
    cfg = job(tmp_path, prompt={"rows_per_request": 5})
    for section, value in change.items():
        cfg[section] = None if value is None else {**(cfg.get(section) or {}), **value}
    if cfg["structured"] is None:
        del cfg["structured"]
    with pytest.raises(ConfigError, match=re.escape(named)) as info:
        pipeline.run(cfg, quiet=True)
    assert "rows_per_request" in str(info.value)
    assert not (tmp_path / "out" / "store.sqlite").exists()
    _ = pl  # polars is the outputs' type


def test_a_row_repeated_across_batches_open_at_once_is_asked_once_and_lands_in_both(tmp_path: Path) -> None:
    # 40 rows in batches of 5, every text 8 times: batches open together share rows that are in flight.
    write_rows(tmp_path / "in.jsonl", 40, dup_every=8)
    cfg = job(tmp_path, prompt={"rows_per_request": 3}, input={"batch_size": 5},
              limits={"max_concurrency": 4}, sim={"latency_ms": 30})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 40, summary
    results = assert_each_id_once(tmp_path / "out", 40)
    assert results["request_key"].n_unique() == 5
    assert summary.requests_sent == 5  # each distinct text once: no batch packed a row another had in flight
