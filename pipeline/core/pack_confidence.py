"""How sure the model was of each row of a pack (`quality.confidence` with `prompt.rows_per_request` > 1).

    measured = measure(record, pack, split, ctx)   # {row key: Measured}; `split` may gain voted answers

`logprobs`: the pack's answer is one JSON document and its logprobs cover all of it. Each row's fields are
measured on the tokens that write its own item's `answer` (send/confidence.py, packed_logprob_confidence),
so a row's confidence never borrows another row's tokens, and two rows with the same value each get their
own. The row's `logprobs` column holds the tokens overlapping its `answer` object. This applies to any
pack answer that came with logprobs (also `params.logprobs: true` without a confidence).

`votes` with n samples in one request: every sample is a whole pack, split into rows by id as the answer
is (prepare/packs.py split_answer). Per row, the samples that answered it vote: a sample whose item for
the row is invalid (or repeated with different answers) counts as a failed vote, as an unusable sample does
one by one; a sample that is unusable as a whole (no valid envelope, cut off) counts as a failed vote for
every row; a sample with no item for the row does not count for it (it said nothing about the row). The
row's answer is the one agreeing with most per-field majorities, each field's confidence the majority's
share of the counted votes. A row no counted sample answered usably is asked again, as a row missing from
a pack is. Votes sent as separate requests (quality.vote_by: requests) are K packs per pack, each of whose
rows is stored as any packed row and voted on by the cascade (core/cascade.py), as one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadContentError
from ..prepare.packs import Pack, Split, split_answer
from ..prepare.structured import StructuredPlan
from ..send.confidence import Fields, packed_logprob_confidence, row_confidence, vote_confidence
from ..vocab import Record


@dataclass(slots=True, frozen=True)
class Measuring:
    """What a pack's rows are measured with: quality.confidence, the row schema's closed fields, the plans."""

    mode: str
    fields: Fields
    pack_plan: StructuredPlan
    row_plan: StructuredPlan


@dataclass(slots=True)
class Measured:
    confidence: float | None = None
    confidence_json: str | None = None
    logprobs_json: str | None = None


def measure(record: Record, pack: Pack, split: Split, ctx: Measuring) -> dict[str, Measured]:
    """Per row key with an answer in `split`, its confidence and its own logprobs. With votes over n
    samples, `split` is first updated in place to the rows' majority answers."""
    out: dict[str, Measured] = {}
    if ctx.mode == "votes":
        for key, shares in _vote(record, pack, split, ctx).items():
            known = {k: v for k, v in shares.items() if v is not None}
            out[key] = Measured(row_confidence(known) if known else None,
                                orjson.dumps(known).decode() if known else None)
    tokens = _tokens(record.logprobs_json)
    if tokens:
        ids = {str(i + 1): row.key for i, row in enumerate(pack.rows)}
        outputs = {rid: split.answers[key] for rid, key in ids.items() if key in split.answers}
        for rid, (by_field, own) in packed_logprob_confidence(tokens, outputs, ctx.fields).items():
            row = out.setdefault(ids[rid], Measured())
            row.logprobs_json = orjson.dumps(own).decode() if own else None
            if ctx.mode == "logprobs" and by_field:
                row.confidence, row.confidence_json = row_confidence(by_field), orjson.dumps(by_field).decode()
    return out


def _tokens(logprobs_json: str | None) -> list[Any]:
    if not logprobs_json:
        return []
    try:
        tokens = orjson.loads(logprobs_json)
    except orjson.JSONDecodeError:
        return []
    return tokens if isinstance(tokens, list) else []


def _vote(record: Record, pack: Pack, split: Split, ctx: Measuring) -> dict[str, dict[str, float | None]]:
    """The rows' majority answers over the answer's n samples (into `split`), and their shares per field;
    {} when the answer holds one sample only (nothing to vote on: the rows keep their one answer)."""
    samples = _samples(record, ctx.pack_plan)
    if len(samples) < 2:
        return {}
    splits = [split_answer(value, pack, ctx.row_plan) if value is not None else None for value in samples]
    shares: dict[str, dict[str, float | None]] = {}
    for row in pack.rows:
        votes = []
        for sample in splits:
            if sample is not None and row.key in sample.missing:
                continue  # this sample did not answer the row: it does not count for it
            votes.append(sample.answers.get(row.key) if sample is not None else None)
        if not any(v is not None for v in votes):
            continue  # no usable answer in any sample: the row keeps the first sample's verdict (asked again)
        index, by_field = vote_confidence(votes, ctx.fields)
        chosen = votes[index]
        split.answers[row.key] = chosen
        split.bad.pop(row.key, None)
        split.missing.discard(row.key)
        split.answer_chars[row.key] = len(orjson.dumps(chosen, option=orjson.OPT_SORT_KEYS))
        shares[row.key] = by_field
    return shares


def _samples(record: Record, plan: StructuredPlan) -> list[Any]:
    """Every choice of the answer as the pack plan reads it (None: unusable), from the raw body."""
    try:
        body = orjson.loads(record.raw) if record.raw else None
    except orjson.JSONDecodeError:
        return []
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return []
    out: list[Any] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        try:
            out.append(plan.extract(message, choice.get("finish_reason"))[0] if isinstance(message, dict) else None)
        except BadContentError:
            out.append(None)
    return out
