"""Confidence from OpenAI-shaped answers: `choices[].logprobs.content` of a json_schema answer (token,
logprob, bytes, top_logprobs) and n sampled choices, through the same parse the dispatcher runs."""
from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from pipeline.config import StructuredConfig
from pipeline.prepare.structured import StructuredPlan
from pipeline.send.budget import Usage
from pipeline.send.confidence import choice_fields, logprob_confidence, vote_confidence
from pipeline.send.parse import parse_completion

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "spam": {"type": "boolean"},
        "note": {"type": "string"},
    },
    "required": ["sentiment", "spam", "note"],
    "additionalProperties": False,
}
USAGE = Usage("openai/gpt-4o-mini", None, 50, 12, 0.0001)


def tok(text: str, p: float, *alts: tuple[str, float]) -> dict[str, Any]:
    """One ChatCompletionTokenLogprob as OpenAI sends it (bytes are the token's UTF-8)."""
    def entry(t: str, q: float) -> dict[str, Any]:
        return {"token": t, "logprob": math.log(q) if q > 0 else -9999.0, "bytes": list(t.encode())}
    return {**entry(text, p), "top_logprobs": [entry(text, p), *(entry(t, q) for t, q in alts)]}


def body(*choices: tuple[list[dict[str, Any]] | None, str]) -> dict[str, Any]:
    """A chat.completion with one choice per (logprobs tokens, content)."""
    return {
        "id": "chatcmpl-AbC", "object": "chat.completion", "created": 1733000000, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": i, "message": {"role": "assistant", "content": content, "refusal": None,
                                             "annotations": []},
                     "logprobs": {"content": tokens, "refusal": None} if tokens is not None else None,
                     "finish_reason": "stop"} for i, (tokens, content) in enumerate(choices)],
        "usage": {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62},
        "service_tier": "default", "system_fingerprint": "fp_0aa8d3e20b",
    }


def plan(mode: str = "json_schema") -> StructuredPlan:
    return StructuredPlan(StructuredConfig.model_validate({"schema": SCHEMA, "mode": mode}), "openai/gpt-4o-mini")


def parsed(tokens: list[dict[str, Any]], mode: str = "json_schema") -> dict[str, float]:
    content = "".join(t["token"] for t in tokens)
    out = parse_completion(body((tokens, content)), USAGE, plan(mode), "logprobs")
    assert out.output == orjson.loads(content)
    return orjson.loads(out.confidence_json) if out.confidence_json else {}


def tail(spam: str = "false", spam_p: float = 1.0, *spam_alts: tuple[str, float]) -> list[dict[str, Any]]:
    return [tok('","', 1.0), tok("spam", 1.0), tok('":', 1.0), tok(spam, spam_p, *spam_alts),
            tok(',"', 1.0), tok("note", 1.0), tok('":"', 1.0), tok("ok", 1.0), tok('"}', 1.0)]


def test_single_token_values_are_their_share_among_the_allowed_values() -> None:
    tokens = [tok('{"', 1.0), tok("sent", 1.0), tok("iment", 1.0), tok('":"', 1.0),
              tok("positive", 0.6, ("negative", 0.2), ("neutral", 0.1), ("good", 0.1)),
              *tail("true", 0.8, ("false", 0.15), (" true", 0.05))]
    conf = parsed(tokens)
    # "good" is no allowed value: left out. " true" is another way to write true (JSON allows the space).
    assert conf["sentiment"] == pytest.approx(0.6 / 0.9, abs=1e-6)
    assert conf["spam"] == pytest.approx(0.85 / 1.0, abs=1e-6)


def test_several_tokenisations_of_the_chosen_value_count_for_it() -> None:
    # The quote merged into the value's token, the value whole or in pieces: all are "positive".
    tokens = [tok('{"sentiment":', 1.0),
              tok('"positive', 0.5, ('"pos', 0.2), ('"posit', 0.05), ('"negative', 0.15), ('"neut', 0.05),
                  ('"', 0.05)),
              *tail()]
    conf = parsed(tokens)
    # '"' alone is consistent with every value: it decides nothing and is left out.
    assert conf["sentiment"] == pytest.approx(0.75 / 0.95, abs=1e-6)


def test_a_value_split_across_tokens_with_a_shared_first_piece() -> None:
    # "ne" starts both negative and neutral: the second piece decides between them.
    tokens = [tok('{"sentiment":"', 1.0), tok("ne", 0.7, ("pos", 0.3)), tok("ut", 0.6, ("g", 0.4)),
              tok("ral", 1.0), *tail()]
    conf = parsed(tokens)
    assert conf["sentiment"] == pytest.approx(0.42 / 1.0, abs=1e-6)  # 0.7*0.6 vs 0.7*0.4 + 0.3


def test_a_character_split_across_tokens_is_matched_by_bytes() -> None:
    schema = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["gai", "gaïté", "triste"]}},
              "required": ["mood"]}
    e_bytes = "ï".encode()
    first = {"token": "ga", "logprob": math.log(0.9), "bytes": list(b"ga"),
             "top_logprobs": [{"token": "ga", "logprob": math.log(0.9), "bytes": list(b"ga")},
                              {"token": "tr", "logprob": math.log(0.1), "bytes": list(b"tr")}]}
    # "ï" arrives as two byte tokens, as OpenAI sends bytes it cannot print alone.
    half1 = {"token": "\\xc3", "logprob": math.log(0.5), "bytes": [e_bytes[0]],
             "top_logprobs": [{"token": "\\xc3", "logprob": math.log(0.5), "bytes": [e_bytes[0]]},
                              {"token": 'i"', "logprob": math.log(0.5), "bytes": list(b'i"')}]}
    half2 = {"token": "\\xaf", "logprob": 0.0, "bytes": [e_bytes[1]], "top_logprobs": []}
    tokens = [tok('{"mood":"', 1.0), first, half1, half2, tok('té"}', 1.0)]
    out = logprob_confidence(tokens, {"mood": "gaïté"}, choice_fields(schema))
    assert out["mood"] == pytest.approx(0.45, abs=1e-6)  # 0.9*0.5 against 0.9*0.5 (gai) + 0.1 (triste)


def test_without_alternatives_the_confidence_is_the_chosen_path_probability() -> None:
    tokens = [tok('{"sentiment":"', 1.0), tok("neutral", 0.7), *tail("false", 0.9)]
    for t in tokens:
        t["top_logprobs"] = []
    conf = parsed(tokens)
    assert conf["sentiment"] == pytest.approx(0.7, abs=1e-6) and conf["spam"] == pytest.approx(0.9, abs=1e-6)


def test_outside_the_top_20_counts_for_nothing() -> None:
    tokens = [tok('{"sentiment":"', 1.0), tok("negative", 0.9, ("positive", 0.0)), *tail()]
    assert parsed(tokens)["sentiment"] == pytest.approx(0.9, abs=1e-6)


def test_row_confidence_is_the_least_sure_field() -> None:
    tokens = [tok('{"sentiment":"', 1.0), tok("negative", 0.9, ("positive", 0.1)),
              *tail("true", 0.6, ("false", 0.4))]
    content = "".join(t["token"] for t in tokens)
    out = parse_completion(body((tokens, content)), USAGE, plan(), "logprobs")
    assert out.confidence == pytest.approx(0.6, abs=1e-6)


def test_tool_mode_answers_carry_no_logprobs_so_no_confidence() -> None:
    args = '{"sentiment":"positive","spam":false,"note":"x"}'
    b = body((None, ""))
    b["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "output", "arguments": args}}]}
    b["choices"][0]["finish_reason"] = "tool_calls"
    out = parse_completion(b, USAGE, plan("tool"), "logprobs")
    assert out.output["sentiment"] == "positive" and out.confidence is None and out.confidence_json is None


def test_logprobs_mode_leaves_tool_mode_out_of_auto() -> None:
    p = StructuredPlan(StructuredConfig.model_validate({"schema": SCHEMA, "mode": "auto"}), "openai/gpt-4o-mini")
    p.prefer_logprobs()
    assert "tool" not in p.modes and p.mode != "tool" and any("logprobs" in n for n in p.notes)


def test_votes_keep_the_majority_sample_and_its_share() -> None:
    answers = ['{"sentiment":"negative","spam":false,"note":"a"}', '{"sentiment":"positive","spam":false,"note":"b"}',
               '{"sentiment":"positive","spam":true,"note":"c"}', '{"sentiment":"positive","spam":false,"note":"d"}',
               'not json']
    out = parse_completion(body(*((None, a) for a in answers)), USAGE, plan(), "votes")
    assert out.output["note"] == "b"  # the first sample agreeing with both majorities
    conf = orjson.loads(out.confidence_json)
    assert conf == {"sentiment": 0.6, "spam": 0.6} and out.confidence == 0.6  # of 5 samples, one unusable


def test_vote_confidence_with_no_usable_sample() -> None:
    assert vote_confidence([None, None], {"a": [True, False]}) == (0, {})
