"""Every request parameter on the wire exactly as configured (the simulator's request log is the
recording endpoint), OpenRouter headers and routing fields, served model/provider per row, cost and budget."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline_simulator import SimConfig, SimulatorThread
from tests.conftest import job
from tests.support import assert_each_id_once

KEY_ENV = "SURFACE_TEST_KEY"
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a product up.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
PROVIDER = {"order": ["OpenAI", "Azure"], "allow_fallbacks": False, "require_parameters": True,
            "data_collection": "deny", "zdr": True, "enforce_distillable_text": False, "only": ["OpenAI", "Azure"],
            "ignore": ["DeepInfra"], "quantizations": ["fp16"], "sort": {"by": "price", "partition": "model"},
            "preferred_min_throughput": {"p90": 20.0}, "preferred_max_latency": 3.5,
            "max_price": {"prompt": 10.0, "completion": 30.0, "image": 0.02}}
EVERYTHING: dict[str, Any] = {
    "seed": 7, "max_tokens": 123, "temperature": 0.3, "top_p": 0.9, "stop": ["END", "\n\n"],
    "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {50256: -100, 11: 5.5}, "logprobs": True,
    "top_logprobs": 3, "tools": TOOLS, "tool_choice": "auto", "response_format": {"type": "json_object"},
    "structured_outputs": True, "stream": True, "models": ["openai/gpt-4-turbo", "openai/gpt-4o"],
    "provider": PROVIDER,
    "extra": {"user": "nightly-job", "transforms": ["middle-out"], "reasoning": {"effort": "low", "exclude": True},
              "metadata": {"team": "labels"}, "usage": {"include": True}, "top_k": 40, "repetition_penalty": 1.1},
}


def sim_job(tmp_path: Path, base_url: str, rows: int = 4, **sections: Any) -> dict[str, Any]:
    """A job against an already running SimulatorThread, with no structured section and no params."""
    cfg = job(tmp_path, rows, **sections)
    cfg["endpoint"] = {"base_url": base_url, "model": "openai/gpt-4-turbo", "api_key_env": KEY_ENV,
                       **sections.get("endpoint", {})}
    cfg.pop("structured", None)
    cfg["params"] = sections.get("params", {})
    return cfg


@contextmanager
def simulator(**options: Any) -> Iterator[tuple[SimulatorThread, str]]:
    thread = SimulatorThread(SimConfig(**options))
    url = thread.start()
    try:
        yield thread, url
    finally:
        thread.stop()


def chat_log(thread: SimulatorThread) -> list[dict[str, Any]]:
    return [e for e in thread.sim.log if e["path"].endswith("/chat/completions")]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-or-v1-test")


def test_every_parameter_reaches_the_wire_exactly_as_configured(tmp_path: Path) -> None:
    with simulator(stream_split_writes=True) as (thread, url):
        cfg = sim_job(tmp_path, url, prompt={"user": "Review as JSON: {{ text }}"}, params=EVERYTHING,
                      endpoint={"headers": {"HTTP-Referer": "https://example.com/app", "X-Title": "Labels",
                                            "X-OpenRouter-Title": "Labels"}})
        s = pipeline.run(cfg)
        log = chat_log(thread)
    assert s.exit_code == 0 and s.succeeded == 4
    assert len(log) == 4
    expected = {k: v for k, v in EVERYTHING.items() if k not in ("extra", "logit_bias")}
    expected.update(EVERYTHING["extra"])
    expected["logit_bias"] = {"50256": -100, "11": 5.5}  # JSON object keys are strings
    expected["stream_options"] = {"include_usage": True}
    expected["model"] = "openai/gpt-4-turbo"
    for entry in log:
        body = dict(entry["body"])
        assert body.pop("messages")[-1]["content"].startswith("Review as JSON: review number")
        assert body == expected
        assert entry["headers"]["HTTP-Referer"] == "https://example.com/app"
        assert entry["headers"]["X-Title"] == entry["headers"]["X-OpenRouter-Title"] == "Labels"
        assert entry["headers"]["Authorization"] == "present"
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert {"ttft_s", "logprobs", "tool_calls", "model", "provider"} <= set(res.columns)


def test_nothing_configured_sends_only_model_and_messages(tmp_path: Path) -> None:
    with simulator() as (thread, url):
        s = pipeline.run(sim_job(tmp_path, url, prompt={"system": None, "user": "Say hi to {{ text }}"}))
        log = chat_log(thread)
    assert s.exit_code == 0
    for entry in log:
        assert set(entry["body"]) == {"model", "messages"}
        assert "HTTP-Referer" not in entry["headers"] and "X-Title" not in entry["headers"]
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert "ttft_s" not in res.columns and "logprobs" not in res.columns


def test_app_title_and_url_set_all_attribution_headers(tmp_path: Path) -> None:
    with simulator() as (thread, url):
        pipeline.run(sim_job(tmp_path, url, 2, endpoint={"app_url": "https://example.com", "app_title": "Nightly"}))
        headers = chat_log(thread)[0]["headers"]
    assert headers["HTTP-Referer"] == "https://example.com"
    assert headers["X-Title"] == headers["X-OpenRouter-Title"] == "Nightly"


def test_per_row_params_from_columns_reach_the_wire(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    with open(data, "w") as fh:
        fh.writelines(json.dumps({"rid": f"r{i}", "text": f"row {i}", "stars": 1, "s": 100 + i,
                                 "budget": None if i == 4 else 20 + i}) + "\n" for i in range(5))
    with simulator() as (thread, url):
        s = pipeline.run(sim_job(tmp_path, url, params={"max_tokens": 50, "seed": 1,
                                                        "from_columns": {"seed": "s", "max_tokens": "budget"}}))
        bodies = [e["body"] for e in chat_log(thread)]
    assert s.exit_code == 0
    by_row = {int(b["messages"][-1]["content"].rsplit(" ", 1)[1]): b for b in bodies}
    assert {i: b["seed"] for i, b in by_row.items()} == {i: 100 + i for i in range(5)}
    # A null cell keeps the configured value.
    assert {i: b["max_tokens"] for i, b in by_row.items()} == {0: 20, 1: 21, 2: 22, 3: 23, 4: 50}


@pytest.mark.parametrize("params,key", [
    ({"temperature": 2.5}, "params.temperature"), ({"top_p": 1.5}, "params.top_p"),
    ({"max_tokens": 0}, "params.max_tokens"), ({"frequency_penalty": -3}, "params.frequency_penalty"),
    ({"presence_penalty": 2.1}, "params.presence_penalty"), ({"stop": ["a", "b", "c", "d", "e"]}, "params.stop"),
    ({"logit_bias": {5: 101}}, "params.logit_bias"), ({"top_logprobs": 21, "logprobs": True}, "params.top_logprobs"),
    ({"top_logprobs": 2}, "params.top_logprobs"), ({"seed": 1.5}, "params.seed"),
    ({"tool_choice": "always"}, "params.tool_choice"), ({"provider": {"sort": "cheapest"}}, "params.provider.sort"),
    ({"provider": {"data_collection": "maybe"}}, "params.provider.data_collection"),
    ({"provider": {"orderr": ["x"]}}, "params.provider.orderr"), ({"tempreature": 1}, "params.tempreature"),
])
def test_invalid_params_name_the_dotted_key(tmp_path: Path, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(job(tmp_path, 1, params=params))
    assert f"{key}:" in str(err.value)


def test_max_tokens_over_the_model_cap_is_refused_before_sending(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params.max_tokens: 5000 is more than openai/gpt-4-turbo"):
        pipeline.run(job(tmp_path, 2, params={"max_tokens": 5000}))
    assert not (tmp_path / "out").exists()


def test_app_title_contradicting_a_header_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="endpoint.app_title: contradicts headers.X-Title"):
        load_config(job(tmp_path, 1, endpoint={"app_title": "A", "headers": {"x-title": "B"}}))


def test_served_model_and_provider_recorded_per_row_with_models_fallback(tmp_path: Path) -> None:
    # The simulator's model_down fault makes OpenRouter serve the next model of `models`.
    sim = {"fault_plan": [{"requests": "1", "fault": "model_down"}]}
    cfg = job(tmp_path, 3, sim=sim, params={"models": ["openai/gpt-4-turbo", "openai/gpt-4o"], "max_tokens": 200},
              limits={"max_concurrency": 1})
    s = pipeline.run(cfg)
    assert s.exit_code == 0
    res = pl.read_parquet(tmp_path / "out" / "results.parquet").sort("rid")
    assert res["model"].to_list() == ["openai/gpt-4o", "openai/gpt-4-turbo", "openai/gpt-4-turbo"]
    assert res["provider"].to_list() == ["OpenAI"] * 3


def test_cost_from_reported_usage_cost_else_price_table(tmp_path: Path) -> None:
    # OpenRouter reports usage.cost: it wins over our table even when the two disagree.
    sim_prices = {"prices": {"openai/gpt-4-turbo": {"input_per_m": 1.0, "output_per_m": 2.0}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pipeline.run(job(tmp_path / "a", 3, sim=sim_prices))
    res = pl.read_parquet(tmp_path / "a" / "out" / "results.parquet")
    expected = res["prompt_tokens"] * 1.0 / 1e6 + res["completion_tokens"] * 2.0 / 1e6
    assert ((res["cost_usd"] - expected).abs() < 1e-12).all()
    # OpenAI reports no cost: the price table (ours, from `prices`) decides.
    pipeline.run(job(tmp_path / "b", 3, sim={"flavor": "openai"},
                     prices={"openai/gpt-4-turbo": {"input_per_m": 100.0, "output_per_m": 300.0}}))
    res = pl.read_parquet(tmp_path / "b" / "out" / "results.parquet")
    expected = res["prompt_tokens"] * 100.0 / 1e6 + res["completion_tokens"] * 300.0 / 1e6
    assert ((res["cost_usd"] - expected).abs() < 1e-12).all() and (res["cost_usd"] > 0).all()


def test_budget_stops_before_the_cap_and_resumes_with_a_higher_one(tmp_path: Path) -> None:
    cap = 0.05
    with simulator(latency_ms=5) as (thread, url):
        cfg = job(tmp_path, 60, limits={"max_concurrency": 8}, budget={"max_cost_usd": cap})
        cfg["endpoint"] = {"base_url": url, "model": "openai/gpt-4-turbo", "api_key_env": KEY_ENV}
        s = pipeline.run(cfg)
        billed = thread.stats()["cost_usd"]
        assert s.exit_code == 3 and s.stopped == "budget"
        assert 0 < s.succeeded < 60 and s.failed == 0 and s.pending == 60 - s.succeeded
        assert "budget.max_cost_usd" in (s.next_step or "")
        assert s.cost_usd <= cap and billed <= cap  # neither our books nor the server's bill pass the cap
        # Same cap again: spend counts across resumes, so resumes only use what is left of it, until
        # not even one more request (at its maximum cost) fits and a resume sends nothing.
        for _ in range(20):
            again = pipeline.run(cfg)
            assert again.exit_code == 3 and again.cost_usd <= cap and thread.stats()["cost_usd"] <= cap
            if again.requests_sent == 0:
                break
        assert again.requests_sent == 0 and again.succeeded < 60
        # What is left is less than one request's worst case (~$0.008: a ~130-token prompt x 1.25 at
        # $10/M plus 200 output tokens at $30/M): the cap was used, not abandoned early.
        assert cap - again.cost_usd < 0.01
        done = pipeline.run(cfg, set=["budget.max_cost_usd=1"])
        assert (done.exit_code, done.succeeded, done.failed) == (0, 60, 0)
        assert done.requests_sent == 60 - again.succeeded and done.cost_usd <= 1
        assert thread.stats()["cost_usd"] == pytest.approx(done.cost_usd)
    assert assert_each_id_once(tmp_path / "out", 60).height == 60


def test_budget_needs_a_price_for_every_model_it_may_be_served_by(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="budget.max_cost_usd: needs a price for 'x/unknown'"):
        load_config(job(tmp_path, 1, params={"models": ["openai/gpt-4-turbo", "x/unknown"]},
                        budget={"max_cost_usd": 1}))


def test_extra_stream_options_merge_with_include_usage(tmp_path: Path) -> None:
    from pipeline.prepare.prompts import Renderer

    extra = {"stream_options": {"include_obfuscation": False}}
    cfg = load_config(job(tmp_path, 1, params={"stream": True, "extra": extra}))
    body = Renderer(cfg).render({"text": "x"}, ("in.jsonl", 1)).body
    assert body["stream_options"] == {"include_usage": True, "include_obfuscation": False}


def test_batch_size_defaults_small_when_images_are_sent(tmp_path: Path) -> None:
    from pipeline.config import DEFAULT_BATCH_SIZE, IMAGE_BATCH_SIZE, load_config

    cfg = job(tmp_path, 3)
    assert load_config(cfg).input.batch_size == DEFAULT_BATCH_SIZE
    cfg["prompt"]["images"] = ["photo"]
    assert load_config(cfg).input.batch_size == IMAGE_BATCH_SIZE
    cfg["input"]["batch_size"] = 10
    assert load_config(cfg).input.batch_size == 10


def test_top_logprobs_alone_is_enough_when_the_confidence_asks_for_logprobs(tmp_path: Path) -> None:
    """quality.confidence: logprobs sets logprobs: true itself, at params.top_logprobs when given; without
    it (or when tool mode falls back to votes) a top_logprobs alone would be refused by the endpoint."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "enum": ["a", "b"]}}, "required": ["s"]}
    cfg = load_config(job(tmp_path, 1, params={"top_logprobs": 3}, quality={"confidence": "logprobs"},
                          structured={"schema": schema, "mode": "json_schema"}))
    assert cfg.quality.body_fields(cfg.params.model_dump(exclude_none=True), cfg.endpoint.base_url) == {
        "logprobs": True, "top_logprobs": 3}
    for extra in ({}, {"quality": {"confidence": "logprobs"}, "structured": {"schema": schema, "mode": "tool"}}):
        with pytest.raises(ConfigError, match=r"params.top_logprobs: top_logprobs requires params.logprobs: true"):
            load_config(job(tmp_path, 1, params={"top_logprobs": 3}, **extra))
