"""One Ray actor of the Ray engine: an async callable class that answers whole shards of input rows.

A shard is one input batch of the local engine (`input.batch_size` rows, the same index, ids and
request keys), read here through the same reader (local paths or s3:// / gs://). Per shard: render,
look up the shard's committed answers in the journal, send only what is missing through one
Dispatcher (the same limits, retry and classification code as the local engine), commit every answer
to the journal before it counts, then publish the shard's results and failures parts, each complete
or absent. Row-level failures are rows in the failures part; only a bug raises out of `__call__`.

The actor keeps one event loop (Ray's, for async actors) and ONE aiohttp session for its lifetime,
created lazily on the first call because the loop only exists inside the actor.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ...build.prompts import Renderer
from ...build.structured import StructuredPlan, plan_for
from ...config import Config
from ...read import storage
from ...read.reader import InputBatch, Source
from ...send.dispatch import Dispatcher, Stopped
from ...send.transport import HttpTransport
from ...state.segments import Journal
from ...state.store import Record
from ...write.output import Layout, RowFailure, write_part
from ..runner import render_batch
from .limiter import RayLimits

RESULTS, FAILURES = "results.parquet", "failures.parquet"


def part_name(shard: int) -> str:
    return f"part-{shard:08d}.parquet"


def make_layout(cfg: Config, plan: StructuredPlan | None) -> Layout:
    return Layout(id_column=cfg.input.id_column or "id", schema=plan.schema if plan else None,
                  with_tool_calls=bool(cfg.params.tools), with_logprobs=bool(cfg.params.logprobs),
                  with_ttft=cfg.params.stream, compression=cfg.output.compression)


class Secret:
    """The API key on its way from the driver's environment to the workers (which on a cluster do not share
    it); never shown by repr or str, so a Ray error or log line that prints arguments cannot leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class Sender:
    """What a worker holds for its lifetime: session, dispatcher, leased limits, journal writer."""

    def __init__(self, cfg: Config, base_url: str, limiter: Any, workers: int, schema: dict[str, Any] | None,
                 api_key: Secret) -> None:
        self.cfg = cfg
        self.plan = plan_for(cfg, schema)
        self.limits = RayLimits(cfg.limits, limiter, workers)
        self.limits.start()
        limiter.hello.remote(os.getpid(), os.uname().nodename)
        self.transport = HttpTransport(
            base_url, api_key.reveal(), cfg.endpoint.request_headers(), timeout_s=cfg.endpoint.timeout_s,
            read_timeout_s=cfg.endpoint.read_timeout_s, connect_timeout_s=cfg.endpoint.connect_timeout_s,
            pool_size=self.limits.cfg.max_concurrency)
        self.journal = Journal(cfg.output.dir, cfg.output.storage_options,
                               interval_s=min(cfg.output.fsync_interval_s, 0.5))
        self.dispatcher = Dispatcher(cfg, self.transport, self.journal, self.limits, self.plan)  # type: ignore[arg-type]
        self.reported = Counter[str]()

    async def answer(self, batch: InputBatch, renderer: Renderer, retry_failed: bool
                     ) -> tuple[list[Record | RowFailure | None], int]:
        """Every row's outcome (None: stopped before an answer) and how many answers the journal had."""
        outcomes, row_keys, jobs = render_batch(batch, renderer, self.plan, self.cfg.endpoint.base_url)
        for key in jobs:
            self.journal.route(key, batch.index)
        try:
            records = await asyncio.to_thread(self.journal.known, batch.index, retry_failed=retry_failed)
            records = {k: r for k, r in records.items() if k in jobs}
            reused = len(records)
            todo = [job for key, job in jobs.items() if key not in records]
            results = await asyncio.gather(*(self.dispatcher.submit(j) for j in todo), return_exceptions=True)
            for job, res in zip(todo, results):
                if isinstance(res, Record):
                    records[job.key] = res
                elif not isinstance(res, (Stopped, asyncio.CancelledError)):
                    raise res  # a bug, not an outcome
        finally:
            self.journal.release(list(jobs), batch.index)
        for i, key in enumerate(row_keys):
            if key is not None and key in records:
                outcomes[i] = records[key]
        return outcomes, reused

    def stats_delta(self) -> dict[str, Any]:
        """What this worker did since its last report: sums stay right however shards interleave."""
        s = self.dispatcher.stats
        now = Counter({"requests": s.requests_sent, "prompt_tokens": s.prompt_tokens,
                       "completion_tokens": s.completion_tokens, "deduplicated": s.deduplicated,
                       **{f"retry_{k}": v for k, v in s.retries.items()}})
        cost = s.cost_usd - self.reported.get("_cost", 0.0)
        delta = {k: now[k] - self.reported.get(k, 0) for k in now}
        self.reported.update({k: v for k, v in delta.items()})
        self.reported["_cost"] = s.cost_usd  # type: ignore[assignment]
        delta["cost_usd"] = cost
        return delta


class ShardWorker:
    """`ds.map_batches(ShardWorker, fn_constructor_kwargs=..., concurrency=run.workers)` over shard indices."""

    def __init__(self, cfg_json: str, source: Source, base_url: str, limiter: Any, workers: int,
                 retry_failed: bool, api_key: Secret, schema: dict[str, Any] | None = None,
                 input_dir: str | None = None, columns: list[str] | None = None) -> None:
        from ...config import load_config
        import orjson
        self.cfg = load_config(orjson.loads(cfg_json))
        self.source, self.base_url, self.workers = source, base_url, workers
        self.limiter, self.retry_failed, self.schema = limiter, retry_failed, schema
        self.api_key = api_key
        self.renderer = Renderer(self.cfg, input_dir=input_dir, columns=columns)
        self.sender: Sender | None = None
        self._tmp = tempfile.mkdtemp(prefix="pipeline-ray-")

    def _sender(self) -> Sender:
        if self.sender is None:  # on the actor's loop, on first use
            self.sender = Sender(self.cfg, self.base_url, self.limiter, self.workers, self.schema, self.api_key)
        return self.sender

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [await self._shard(int(s)) for s in batch["shard"]]
        return {k: [r[k] for r in rows] for k in rows[0]}

    async def _shard(self, shard: int) -> dict[str, Any]:
        sender = self._sender()
        stop = sender.dispatcher.stop_reason
        out: dict[str, Any] = {"shard": shard, "rows": 0, "ok": 0, "failed": 0, "pending": 0, "reused": 0,
                               "stop": stop or "", "message": str(sender.dispatcher.fatal or "")}
        inp = await asyncio.to_thread(self._read, shard)
        out["rows"] = len(inp.rows)
        if stop:
            out["pending"] = len(inp.rows)
        else:
            outcomes, out["reused"] = await sender.answer(inp, self.renderer, self.retry_failed)
            out["pending"] = sum(1 for o in outcomes if o is None)
            if not out["pending"]:
                out["ok"], out["failed"] = await asyncio.to_thread(self._publish, inp, outcomes, sender.plan)
        out["stop"] = sender.dispatcher.stop_reason or ""
        out["message"] = str(sender.dispatcher.fatal or "")
        out.update(sender.stats_delta())
        return out

    def _read(self, shard: int) -> InputBatch:
        return next(self.source.batches(skip=lambda b: b != shard))

    def _publish(self, inp: InputBatch, outcomes: list[Record | RowFailure | None],
                 plan: StructuredPlan | None) -> tuple[int, int]:
        """Both parts of a finished shard, failures first: a results part marks the shard done."""
        tmp = Path(self._tmp)
        ok, bad = write_part(tmp, inp.index, make_layout(self.cfg, plan), inp.carried, outcomes)
        opts, root, name = self.cfg.output.storage_options, self.cfg.output.dir, part_name(inp.index)
        for local, folder in ((f"{inp.index:08d}.f.parquet", FAILURES), (f"{inp.index:08d}.r.parquet", RESULTS)):
            storage.put_file(str(tmp / local), storage.join(root, folder, name), opts)
            os.unlink(tmp / local)
        return ok, bad
