"""The engine as a transformer: input batches in, outcome batches out, with every seam injected (a scripted
transport and an in-memory answer store, on the virtual clock): no files, no store, no signals."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.core.transformer import Core, OutcomeBatch
from pipeline.prepare.prompts import Renderer
from pipeline.read.reader import Source
from pipeline.send.limits import Limits
from pipeline.vocab import Record, RowFailure
from pipeline.write.output import OutputColumns
from tests.conftest import job, write_rows
from tests.fakes import MemoryAnswers, Scripted, completion
from tests.vclock import run_virtual


def setup(tmp_path: Path, rows: int, **sections: Any) -> tuple[Any, Source, Renderer]:
    write_rows(tmp_path / "in.jsonl", rows, dup_every=2)  # every text twice: one request per pair
    with open(tmp_path / "in.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"rid": "no-text", "stars": 1}) + "\n")  # cannot become a request
    cfg = job(tmp_path, rows, input={"batch_size": 4}, limits={"max_concurrency": 2}, **sections)
    cfg["endpoint"] = {"base_url": "http://scripted.invalid/v1", "model": "openai/gpt-4-turbo"}
    del cfg["structured"]
    cfg = load_config(cfg)
    source = Source(cfg.input)
    scan = source.scan()
    return cfg, source, Renderer(cfg, columns=scan.columns)


def drive(core: Core, source: Source) -> list[OutcomeBatch]:
    async def go() -> list[OutcomeBatch]:
        async with contextlib.aclosing(core.outcomes(source.batches())) as stream:
            return [out async for out in stream]
    return sorted(run_virtual(go()), key=lambda o: o.index)


def test_batches_in_outcome_batches_out_through_the_injected_seams(tmp_path: Path) -> None:
    cfg, source, renderer = setup(tmp_path, 10)
    answers = MemoryAnswers()
    fake = Scripted(lambda body: completion({"content": "positive"}), latency_s=0.2)
    core = Core(cfg, renderer, None, answers=answers, limiter=Limits(cfg.limits), transport=fake)
    outs = drive(core, source)
    assert [o.index for o in outs] == [0, 1, 2] and all(o.complete for o in outs)
    rows = [o for out in outs for o in out.outcomes]
    assert sum(isinstance(o, Record) and o.state == "ok" for o in rows) == 10
    assert [o.error_class for o in rows if isinstance(o, RowFailure)] == ["input"]
    assert len(fake.bodies) == 5 == len(answers.records)  # identical rows share one request
    keys = [k for out in outs for k in out.keys]
    assert keys[0] == keys[1] and keys[-1] is None
    assert (core.stats.requests_sent, core.stats.deduplicated, core.stop_reason) == (5, 5, None)
    results, failures = outs[0].tables(OutputColumns(id_column="rid", schema=None))
    assert results.num_rows == 4 and failures.num_rows == 0 and "request_key" in results.column_names


def test_answers_the_store_already_holds_are_not_sent_again(tmp_path: Path) -> None:
    cfg, source, renderer = setup(tmp_path, 10)
    answers = MemoryAnswers()
    first = Scripted(lambda body: completion({"content": "positive"}))
    drive(Core(cfg, renderer, None, answers=answers, limiter=Limits(cfg.limits), transport=first), source)
    again = Scripted(lambda body: completion({"content": "positive"}))
    outs = drive(Core(cfg, renderer, None, answers=answers, limiter=Limits(cfg.limits), transport=again), source)
    assert again.bodies == [] and all(o.complete for o in outs)


def test_after_a_stop_the_rows_not_answered_are_pending(tmp_path: Path) -> None:
    cfg, source, renderer = setup(tmp_path, 10)
    fake = Scripted(lambda body: (401, {"error": {"message": "bad key", "code": 401}}))
    core = Core(cfg, renderer, None, answers=MemoryAnswers(), limiter=Limits(cfg.limits), transport=fake)
    outs = drive(core, source)
    assert core.stop_reason == "fatal" and core.fatal is not None and "bad key" in str(core.fatal)
    assert outs and not any(o.complete for o in outs if any(k is not None for k in o.keys))
    assert all(o is None for out in outs for o, k in zip(out.outcomes, out.keys) if k is not None)
    assert len(fake.bodies) <= cfg.limits.max_concurrency  # nothing sent after the stop was known
