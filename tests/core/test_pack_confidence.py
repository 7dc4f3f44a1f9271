"""Confidence of packed rows (core/pack_confidence.py) from OpenAI-shaped chat.completion bodies of a pack's
answer, read as the dispatcher reads them (parse_completion with the pack plan) and split into rows as the
pack sender does: logprobs attributed to each row's own item, votes over n samples per row."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from pipeline.config import StructuredConfig
from pipeline.core.pack_confidence import Measuring, measure
from pipeline.prepare.packs import Pack, PackPlan, PackRow, split_answer
from pipeline.prepare.structured import StructuredPlan
from pipeline.send.confidence import choice_fields
from pipeline.send.parse import parse_completion
from pipeline.vocab import Record, Request
from tests.send.test_confidence import USAGE, body, tok

SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                                           "spam": {"type": "boolean"}},
          "required": ["sentiment", "spam"], "additionalProperties": False}


def plans() -> tuple[StructuredPlan, PackPlan]:
    row = StructuredPlan(StructuredConfig.model_validate({"schema": SCHEMA, "mode": "json_schema"}), "openai/gpt-4o")
    return row, PackPlan(row)


def pack(n: int) -> Pack:
    rows = []
    for i in range(n):
        req = Request(f"key{i + 1}", {}, {}, 10, 50)
        rows.append(PackRow(f"key{i + 1}", f"text {i + 1}", 20, req))
    return Pack(Request("pack", {}, {}, 50, 300), rows, 100)


def measured(reply: dict[str, Any], n: int, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per row key: (output, confidence_by_field, own tokens' text)) and the split's bad rows."""
    row_plan, pack_plan = plans()
    parsed = parse_completion(reply, USAGE, pack_plan, mode)
    assert parsed.confidence is None  # the pack itself has no closed fields: its rows are measured
    record = Record("pack", "ok", output_json=orjson.dumps(parsed.output).decode(), content=parsed.content,
                    logprobs_json=parsed.logprobs_json, raw=orjson.dumps(reply))
    p = pack(n)
    split = split_answer(parsed.output, p, row_plan)
    rows = measure(record, p, split, Measuring(mode, choice_fields(SCHEMA), pack_plan, row_plan))
    out = {}
    for key, answer in split.answers.items():
        m = rows.get(key)
        conf = orjson.loads(m.confidence_json) if m is not None and m.confidence_json else None
        own = "".join(t["token"] for t in orjson.loads(m.logprobs_json)) if m and m.logprobs_json else None
        out[key] = (answer, conf, own)
    return out, split.bad


def packed_tokens() -> list[dict[str, Any]]:
    """Three rows; rows 1 and 2 both answer "positive", each with its own tokenisation and probability;
    row 3's value is split across tokens whose first piece two values share. Ids come out of order."""
    return [
        tok('{"answers":[{"id":"2","answer":{"sentiment":', 1.0),
        # Row 2: the quote merged into the value's token; '"pos' is another way to write the same value.
        tok('"positive', 0.5, ('"pos', 0.2), ('"negative', 0.2), ('"', 0.1)),
        tok('","spam":', 1.0), tok("false", 0.9, ("true", 0.1)),
        tok('}},{"id":"1","answer":{"sentiment":"', 1.0),
        # Row 1: the same value split across two tokens, less sure.
        tok("pos", 0.6, ("neg", 0.3), ("neut", 0.1)), tok("itive", 1.0),
        tok('","spam":', 1.0), tok("true", 0.55, ("false", 0.45)),
        tok('}},{"id":"3","answer":{"sentiment":"', 1.0),
        tok("ne", 0.7, ("pos", 0.3)), tok("ut", 0.6, ("g", 0.4)), tok("ral", 1.0),
        tok('","spam":', 1.0), tok("false", 1.0),
        tok("}}]}", 1.0),
    ]


def test_each_rows_fields_are_measured_on_its_own_items_tokens() -> None:
    tokens = packed_tokens()
    content = "".join(t["token"] for t in tokens)
    rows, bad = measured(body((tokens, content)), 3, "logprobs")
    assert not bad
    (a1, c1, own1), (a2, c2, own2), (a3, c3, own3) = rows["key1"], rows["key2"], rows["key3"]
    assert a1 == {"sentiment": "positive", "spam": True} and a2 == {"sentiment": "positive", "spam": False}
    assert a3 == {"sentiment": "neutral", "spam": False}
    # The same value in two rows: each its own probability, never the other row's tokens.
    assert c2["sentiment"] == pytest.approx(0.7 / 0.9, abs=1e-6) and c2["spam"] == pytest.approx(0.9, abs=1e-6)
    assert c1["sentiment"] == pytest.approx(0.6, abs=1e-6) and c1["spam"] == pytest.approx(0.55, abs=1e-6)
    assert c3["sentiment"] == pytest.approx(0.42, abs=1e-6)  # 0.7*0.6 against 0.7*0.4 + 0.3
    assert c3["spam"] == pytest.approx(1.0)
    # Each row's logprobs are the tokens that write its own answer object (and the edges they share).
    assert own1 == '}},{"id":"1","answer":{"sentiment":"' + "pos" + "itive" + '","spam":' + "true" + \
        '}},{"id":"3","answer":{"sentiment":"'
    assert own2 == "".join(t["token"] for t in tokens[:5])
    assert own3.startswith('}},{"id":"3"') and own3.endswith("}}]}") and "pos" not in own3


def test_rows_at_the_pack_level_measure_like_one_by_one() -> None:
    # The same tokens for one row alone, unwrapped, give the same confidence as inside the pack.
    lone = [tok('{"sentiment":"', 1.0), tok("pos", 0.6, ("neg", 0.3), ("neut", 0.1)), tok("itive", 1.0),
            tok('","spam":', 1.0), tok("true", 0.55, ("false", 0.45)), tok("}", 1.0)]
    row_plan, _ = plans()
    out = parse_completion(body((lone, "".join(t["token"] for t in lone))), USAGE, row_plan, "logprobs")
    packed, _ = measured(body((packed_tokens(), "".join(t["token"] for t in packed_tokens()))), 3, "logprobs")
    assert orjson.loads(out.confidence_json) == packed["key1"][1]


def test_a_row_the_answer_lacks_gets_nothing_and_another_keeps_its_own() -> None:
    tokens = packed_tokens()[:4] + [tok("}}]}", 1.0)]  # only id 2 answered
    content = "".join(t["token"] for t in tokens)
    rows, bad = measured(body((tokens, content)), 3, "logprobs")
    assert set(rows) == {"key2"} and set(bad) == {"key1", "key3"}
    assert rows["key2"][1]["sentiment"] == pytest.approx(0.7 / 0.9, abs=1e-6)


def test_an_integer_id_and_spaces_in_the_json_are_read_as_the_split_reads_them() -> None:
    tokens = [tok('{ "answers" : [ { "id" : 1 , "answer" : { "sentiment" : ', 1.0),
              tok('"negative', 0.8, ('"positive', 0.2)), tok('" , "spam" : ', 1.0), tok("false", 1.0),
              tok(" } } ] }", 1.0)]
    rows, _ = measured(body((tokens, "".join(t["token"] for t in tokens))), 1, "logprobs")
    assert rows["key1"][1]["sentiment"] == pytest.approx(0.8, abs=1e-6)


def _pack_answer(*rows: tuple[str, Any]) -> str:
    return orjson.dumps({"answers": [{"id": rid, "answer": a} for rid, a in rows]}).decode()


def test_votes_over_n_samples_take_each_rows_majority_counting_only_samples_that_answered_it() -> None:
    pos, neg, neu = ({"sentiment": s, "spam": False} for s in ("positive", "negative", "neutral"))
    samples = [
        (None, _pack_answer(("1", pos), ("2", neg), ("3", neu))),
        (None, _pack_answer(("1", pos), ("2", pos))),                                # no item for row 3
        (None, _pack_answer(("1", neg), ("2", neg), ("3", {"sentiment": "great", "spam": False}))),  # 3 invalid
        (None, _pack_answer(("2", {**neg, "spam": True}), ("1", pos))),
    ]
    reply = body(*samples)
    reply["choices"].append({**reply["choices"][0], "index": 4, "finish_reason": "length",
                             "message": {"role": "assistant", "content": '{"answers":[{"id":"1"'}})
    rows, bad = measured(reply, 3, "votes")
    assert not bad
    # Row 1: positive 3 of 5 votes (the cut-off sample is a failed vote for every row).
    assert rows["key1"][0] == pos and rows["key1"][1] == {"sentiment": 0.6, "spam": 0.8}
    # Row 2: negative 3 of 5; spam false 3 of 5 (the answer agreeing with both majorities is kept).
    assert rows["key2"][0] == neg and rows["key2"][1] == {"sentiment": 0.6, "spam": 0.6}
    # Row 3: samples 2 and 4 said nothing about it (not counted); sample 3's invalid answer and the cut-off
    # one are failed votes: neutral 1 of 3.
    assert rows["key3"][0] == neu and rows["key3"][1] == pytest.approx({"sentiment": 1 / 3, "spam": 1 / 3})


def test_a_row_no_sample_answered_usably_is_asked_again() -> None:
    pos = {"sentiment": "positive", "spam": False}
    reply = body((None, _pack_answer(("1", pos))), (None, _pack_answer(("1", pos), ("2", {"sentiment": "x"}))))
    rows, bad = measured(reply, 2, "votes")
    assert rows["key1"][1] == {"sentiment": 1.0, "spam": 1.0} and set(bad) == {"key2"}


def test_a_token_running_past_a_rows_value_into_the_next_item_decides_only_that_value() -> None:
    # `false}},{"` ends row 1's object and starts row 2's item in one token; its alternative decides row 1's
    # spam only. An empty token (a tokenizer's zero-width piece) writes nothing and is skipped.
    tokens = [tok('{"answers":[{"id":"1","answer":{"sentiment":"negative","spam":', 1.0),
              tok('false}},{"', 0.8, ('true}},{"', 0.2)), tok("", 1.0),
              tok('id":"2","answer":{"sentiment":"negative","spam":', 1.0),
              tok("true", 0.65, ("false", 0.35)), tok("}}]}", 1.0)]
    rows, bad = measured(body((tokens, "".join(t["token"] for t in tokens))), 2, "logprobs")
    assert not bad
    assert rows["key1"][1] == {"sentiment": pytest.approx(1.0), "spam": pytest.approx(0.8, abs=1e-6)}
    assert rows["key2"][1] == {"sentiment": pytest.approx(1.0), "spam": pytest.approx(0.65, abs=1e-6)}
