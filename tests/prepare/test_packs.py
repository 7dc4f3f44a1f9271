"""The pack format (prepare/packs.py): what every pack shares, how an answer is split back into rows, and
how a pack's bill is apportioned."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from pipeline.config import load_config
from pipeline.prepare.packs import Packer, Share, apportion, pack_schema, packed_key, shares, split_answer
from pipeline.prepare.prompts import Renderer
from pipeline.prepare.request import RequestBuilder
from pipeline.prepare.structured import plan_for
from pipeline.vocab import InputBatch, Request
from tests.conftest import SCHEMA, job

ROW_SCHEMA = {"type": "object", "properties": {"label": {"$ref": "#/$defs/label"}}, "required": ["label"],
              "$defs": {"label": {"type": "string", "enum": ["a", "b"]}}}


def _requests(tmp_path: Path, texts: list[str], *, schema: dict[str, Any] = SCHEMA,
              **sections: Any) -> tuple[Packer, list[Request]]:
    cfg = load_config(job(tmp_path, prompt={"rows_per_request": 4}, structured={"schema": schema},
                          endpoint={"model": "openai/gpt-4o-mini"}, **sections))
    plan = plan_for(cfg)
    assert plan is not None
    renderer = Renderer(cfg)
    builder = RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens)
    rows = [{"rid": f"r{i}", "text": t, "stars": i % 5, "temp": 0.5 if i % 2 else 0.0} for i, t in enumerate(texts)]
    batch = InputBatch(index=0, rows=rows, ids=[r["rid"] for r in rows], errors=[None] * len(rows),
                       origins=[None] * len(rows), carried=None)  # type: ignore[arg-type]
    built = Packer.rekey(builder.build_batch(batch, renderer))
    packer = Packer.of(cfg, plan, renderer.tokens)
    assert packer is not None and packer.user_prefix == "Review: "
    return packer, list(built.requests.values())


def _body(request: Request) -> dict[str, Any]:
    return orjson.loads(request.payload)


def test_every_pack_shares_its_prefix_byte_for_byte_and_carries_no_id_or_count_before_the_rows(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, [f"text {i}" * (i + 1) for i in range(7)])
    packs = packer.packs(rows)
    assert [len(p.rows) for p in packs] == [4, 3]
    a, b = (_body(p.request) for p in packs)
    assert a["messages"][:-1] == b["messages"][:-1]
    assert a["response_format"] == b["response_format"]  # the pack schema: the same for every pack
    assert {k for k in a if a[k] != b[k]} <= {"messages", "max_tokens"}
    rows_a = orjson.loads(a["messages"][-1]["content"])["rows"]
    assert [r["id"] for r in rows_a] == ["1", "2", "3", "4"]
    assert [r["input"] for r in rows_a] == [f"text {i}" * (i + 1) for i in range(4)]  # "Review: " goes once, before
    assert a["messages"][-2] == {"role": "user", "content": "Review: "}
    assert a["max_tokens"] == 4 * (200 + 16) + 16  # each row's max_tokens and room for its wrapper


def test_a_packed_rows_key_is_its_own_and_never_a_one_by_one_key(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, ["same", "same", "other"])
    assert len(rows) == 2  # identical rows are one request
    assert packed_key("k" * 64) != "k" * 64 and packed_key("k" * 64) == packed_key("k" * 64)
    # The key does not depend on the pack a row travels in.
    assert {r.key for r in rows} == {r.key for p in packer.packs(rows, 1) for r in p.rows}


def test_rows_with_different_parameters_go_to_different_packs(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, [f"t{i}" for i in range(6)], params={"from_columns": {"temperature": "temp"}})
    packs = packer.packs(rows)
    assert sorted(len(p.rows) for p in packs) == [3, 3]
    for p in packs:
        assert len({_body(r.request)["temperature"] for r in p.rows}) == 1


def test_the_pack_schema_keeps_the_row_schemas_references_resolvable(tmp_path: Path) -> None:
    schema = pack_schema(ROW_SCHEMA)
    Draft202012Validator.check_schema(schema)
    ok = {"answers": [{"id": "1", "answer": {"label": "a"}}]}
    bad = {"answers": [{"id": "1", "answer": {"label": "c"}}]}
    assert Draft202012Validator(schema).is_valid(ok) and not Draft202012Validator(schema).is_valid(bad)
    packer, rows = _requests(tmp_path, ["x", "y"], schema=ROW_SCHEMA)
    sent = _body(packer.packs(rows)[0].request)["response_format"]["json_schema"]["schema"]
    assert "$defs" in sent and "id" in sent["properties"]["answers"]["items"]["properties"]


def test_split_assigns_only_what_is_under_a_rows_own_id(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, [f"t{i}" for i in range(4)], schema=ROW_SCHEMA)
    pack = packer.packs(rows)[0]
    plan = packer.plan.row
    value = {"answers": [
        {"id": "1", "answer": {"label": "a"}},
        {"id": "2", "answer": {"label": "b"}}, {"id": "2", "answer": {"label": "b"}},  # the same twice: fine
        {"id": "3", "answer": {"label": "a"}}, {"id": "3", "answer": {"label": "b"}},  # two different
        {"id": "9", "answer": {"label": "a"}},  # an id the pack did not ask
        {"id": 4, "answer": {"label": "zzz"}},  # invalid for the row schema
    ]}
    split = split_answer(value, pack, plan)
    keys = [r.key for r in pack.rows]
    assert split.answers == {keys[0]: {"label": "a"}, keys[1]: {"label": "b"}}
    assert set(split.bad) == {keys[2], keys[3]} and split.unknown_ids == 1
    assert "2 different answers" in split.bad[keys[2]] and "schema" in split.bad[keys[3]]
    missing = split_answer({"answers": []}, pack, plan)
    assert set(missing.bad) == set(keys) and "no item" in missing.bad[keys[0]]


@pytest.mark.parametrize("total, weights", [(10, [1, 1, 1]), (7, [5, 0, 2]), (0, [1, 2]), (3, [0, 0])])
def test_shares_add_up_exactly(total: int, weights: list[float]) -> None:
    parts = shares(total, weights)
    assert sum(parts) == total and all(p >= 0 for p in parts)


def test_a_packs_bill_is_apportioned_to_its_rows_and_adds_up(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, ["short", "a much longer review text " * 10, "mid length text here"])
    pack = packer.packs(rows)[0]
    billed = Share(1000, 90, 0.0123)
    parts = apportion(pack, billed, {pack.rows[0].key: 20, pack.rows[1].key: 20}, 60, (0.15, 0.6))
    assert sum(p.prompt_tokens for p in parts) == 1000 and sum(p.completion_tokens for p in parts) == 90
    assert sum(p.cost_usd for p in parts) == pytest.approx(0.0123)
    assert parts[1].prompt_tokens > parts[2].prompt_tokens > parts[0].prompt_tokens  # its own text counts
    assert parts[2].completion_tokens < parts[0].completion_tokens  # it got no answer: only the wrapper


def test_the_templates_fixed_start_travels_once_before_the_rows_with_its_cache_mark(tmp_path: Path) -> None:
    packer, rows = _requests(tmp_path, ["one", "two", "three"])
    packer = Packer(4, "simulator", packer.plan.row, packer.builder.tokens, user_prefix="Review: ")
    body = _body(packer.packs(rows)[0].request)
    lead, last = body["messages"][-2], body["messages"][-1]
    assert lead == {"role": "user", "content": "Review: "}
    assert [r["input"] for r in orjson.loads(last["content"])["rows"]] == ["one", "two", "three"]
    # With a breakpoint-style cache mark on the rows' shared text, the shared message carries it.
    mark = {"type": "ephemeral"}
    marked = [Request(r.key, r.shaped, {**r.body, "messages": [*r.body["messages"][:-1], {"role": "user", "content": [
        {"type": "text", "text": "Review: ", "cache_control": mark},
        {"type": "text", "text": r.body["messages"][-1]["content"][len("Review: "):]}]}]}, r.est_prompt, r.max_tokens)
        for r in rows]
    body = _body(packer.packs(marked)[0].request)
    assert body["messages"][-2]["content"] == [{"type": "text", "text": "Review: ", "cache_control": mark}]
    assert [r["input"] for r in orjson.loads(body["messages"][-1]["content"])["rows"]] == ["one", "two", "three"]
    assert "cache_control" not in body["messages"][-1]  # never in row content
