"""One Ray actor of the Ray engine: an async callable class that answers whole shards of input rows.

A shard is one input batch of the local engine (`input.batch_size` rows, the same index, ids and
request keys), named after its content (plan.py), read here through the same reader (local paths or
s3:// / gs://). Per shard: render, look up the committed answers in the shard's journal folder and in
those of the shards that held its rows before (the row map's "donors"), send only what is missing through the actor's
`engines.core.Core` (the same build, limits, retry and classification code as the local engine), commit
every answer to the journal before it counts, copy the answers it reused from donors into its own folder,
then publish the shard's results and failures parts, each complete or absent. Row-level failures are rows
in the failures part; only a bug raises out of `__call__`. The `pipeline` logger's events go back to the
driver with each shard's figures (invocation.LineCapture), for the job's one pipeline.log.

The actor keeps one event loop (Ray's, for async actors) and ONE aiohttp session for its lifetime,
created lazily on the first call because the loop only exists inside the actor.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from ...common import redact
from ...config import Config
from ...core.transformer import Core, OutcomeBatch
from ...errors import RunFatalError
from ...models.prices import find_price
from ...prepare.prompts import Renderer
from ...prepare.structured import StructuredPlan, plan_for
from ...read import storage
from ...read.reader import Source
from ...send.transport import HttpTransport
from ...state.segments import COMMIT_S, Journal
from ...vocab import InputBatch, Record
from ...write.output import OutputColumns, quality_layout
from .budget import RayBudget
from .invocation import LineCapture
from .limiter import RayLimits
from .plan import FAILURES, RESULTS, RowMap, id_hashes, part_name

# The shard a Core task works for: set by the worker before it feeds the shard's batch to the core;
# asyncio tasks copy it at creation, so lookups and commits of concurrent shards never mix.
CURRENT_SHARD: contextvars.ContextVar[str] = contextvars.ContextVar("pipeline_ray_shard")


def make_layout(cfg: Config, plan: StructuredPlan | None) -> OutputColumns:
    return OutputColumns(id_column=cfg.input.id_column or "id", schema=plan.schema if plan else None,
                         with_tool_calls=bool(cfg.params.tools), with_logprobs=bool(cfg.params.logprobs),
                         with_ttft=cfg.params.stream, compression=cfg.output.compression,
                         cost_unknown=find_price(cfg, cfg.endpoint.model) is None,
                         **quality_layout(cfg, plan.schema if plan else None))


class JournalAnswers:
    """The core's AnswerStore (core/transformer.py) over the journal: per-shard lookups, durable puts.

    A shard may look up several times (a cascade's stages, the audit, votes as requests): each lookup
    sees the shard's preloaded answers, and every key a shard asked for is kept (`asked`) so the worker
    releases them all and copies every answer the shard used from donors into its own folder."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.preloaded: dict[str, dict[str, Record]] = {}
        self.asked: dict[str, set[str]] = {}

    def lookup(self, keys: Collection[str]) -> dict[str, Record]:
        shard = CURRENT_SHARD.get()
        known = self.preloaded.get(shard, {})
        asked = self.asked.setdefault(shard, set())
        for key in keys:
            self.journal.route(key, shard)  # answers to the keys still to send are committed to this shard
            asked.add(key)
        return {k: known[k] for k in keys if k in known}

    async def put(self, record: Record) -> None:
        if record.key not in self.journal.routes:  # a re-shaped request (structured-mode fallback): new key
            self.journal.route(record.key, CURRENT_SHARD.get())
            self.asked.setdefault(CURRENT_SHARD.get(), set()).add(record.key)
        try:
            await self.journal.put(record)
        except OSError as exc:
            raise RunFatalError(f"cannot commit answers to {self.journal.path}: {exc}; fix the storage, then "
                                "re-run the same command to resume") from exc

    def note(self, name: str, value: str) -> None:
        self.journal.set_meta(name, value)


class Secret:
    """The API key (or the secret headers' values) on its way from the driver's environment to the workers
    (which on a cluster do not share it); never shown by repr or str, so a Ray error or log line that
    prints arguments cannot leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def reveal(self) -> Any:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class Wiring:
    """What a driver hands every worker of a job (ShardWorker, LabelWorker): the job's config, where to
    send, the job's limiter actor, how many workers share it, the secrets, and the schema asked for."""

    cfg_json: str
    base_url: str
    limiter: Any
    workers: int
    api_key: Secret
    secret_headers: Secret | None = None
    schema: dict[str, Any] | None = None

    @classmethod
    def of(cls, cfg: Config, base_url: str, limiter: Any, schema: dict[str, Any] | None) -> Wiring:
        """In the driver: the config without its source path, the secrets from the driver's environment."""
        return cls(cfg.model_dump_json(by_alias=True, exclude={"source"}), base_url, limiter, cfg.run.workers,
                   Secret(cfg.api_key()), Secret(cfg.endpoint.secret_header_values(cfg.source)), schema)

    def config(self) -> Config:
        from ...config import load_config
        return load_config(orjson.loads(self.cfg_json))


@dataclass(frozen=True)
class ShardInput:
    """Where a ShardWorker reads its shards: the input, its folder (relative image paths), its columns,
    the row map ([its ObjectRef], fetched on first use), and whether failed answers are asked again."""

    source: Source
    retry_failed: bool = False
    input_dir: str | None = None
    columns: list[str] | None = None
    row_map: list[Any] | None = None


class Sender:
    """What a worker holds for its lifetime: one session, one core, leased limits, the journal writer."""

    def __init__(self, cfg: Config, wiring: Wiring, renderer: Renderer) -> None:
        self.cfg = cfg
        self.plan = plan_for(cfg, wiring.schema)
        self.worker = worker_id()
        limiter = wiring.limiter
        self.limits = RayLimits(cfg.limits, limiter, wiring.workers, worker=self.worker)
        self.limits.on_halt = self._halt
        self.limits.start()
        limiter.hello.remote(os.getpid(), os.uname().nodename, self.worker)
        self.transport = HttpTransport(
            wiring.base_url, wiring.api_key.reveal(), _headers(cfg, wiring.secret_headers),
            timeout_s=cfg.endpoint.timeout_s,
            read_timeout_s=cfg.endpoint.read_timeout_s, connect_timeout_s=cfg.endpoint.connect_timeout_s,
            pool_size=self.limits.cfg.max_concurrency)
        # Flush early when half this worker's slots wait for a commit: waiting longer only idles them.
        self.journal = Journal(cfg.output.dir, cfg.output.storage_options,
                               interval_s=min(cfg.output.fsync_interval_s, COMMIT_S),
                               max_records=max(1, self.limits.cfg.max_concurrency // 2))
        self.answers = JournalAnswers(self.journal)
        # The job's one budget, held by the limiter actor for all workers (budget.py); without a cap it
        # reserves nothing but still tells the actor what the endpoint bills over the table.
        budget = RayBudget(cfg.budget.max_cost_usd, limiter, self.worker)
        self.core = Core(cfg, renderer, self.plan, answers=self.answers, limiter=self.limits,
                         transport=self.transport, budget=budget)  # type: ignore[arg-type]
        self.reported: Counter[str] = Counter()
        self.last_known: dict[str, Record] = {}
        self.reported_cost = 0.0
        self.reported_saved = 0.0

    def _halt(self, message: str) -> None:
        """The driver lost its lease (another driver runs this job now): stop sending at once."""
        if not self.core.stop_reason:
            self.core.fail_run(RunFatalError(message))

    async def answer(self, batch: InputBatch, retry_failed: bool, shard: str,
                     donors: Collection[str] = ()) -> tuple[OutcomeBatch, int]:
        """The core's outcome for one shard, and how many of its answers the journal already had (in its
        own folder or its donors'; those from donors are copied into its own folder before it returns)."""
        own = await asyncio.to_thread(self.journal.known, [shard], retry_failed=retry_failed)
        lent = await asyncio.to_thread(self.journal.known, sorted(set(donors) - {shard}),
                                       retry_failed=retry_failed) if donors else {}
        known = {**lent, **own}
        self.last_known = known
        self.answers.preloaded[shard] = known
        self.answers.asked[shard] = set()
        CURRENT_SHARD.set(shard)
        result: OutcomeBatch | None = None
        try:
            async with contextlib.aclosing(self.core.outcomes([batch])) as stream:
                async for out in stream:
                    result = out
        finally:
            self.answers.preloaded.pop(shard, None)
            asked = self.answers.asked.pop(shard, set())
            if result is not None:
                self.journal.release(sorted(asked), shard)
        assert result is not None
        # Every answer the shard used (each cascade stage's, the audit's), not only the deciding ones.
        adopted = [lent[k] for k in asked if k in lent and k not in own]
        if adopted:  # this shard's folder holds all its rows' answers before its part says "done"
            await asyncio.to_thread(self.journal.adopt, shard, adopted)
        reused = sum(1 for k in result.keys if k is not None and k in known)
        return result, reused

    def stats_delta(self) -> dict[str, Any]:
        """What this worker did since its last report: sums stay right however shards interleave."""
        s = self.core.stats
        now = Counter({"requests": s.requests_sent, "prompt_tokens": s.prompt_tokens,
                       "completion_tokens": s.completion_tokens, "deduplicated": s.deduplicated,
                       "cached_tokens": s.cached_tokens, "cache_write_tokens": s.cache_write_tokens,
                       **{f"retry_{k}": v for k, v in s.retries.items()}})
        delta: dict[str, Any] = {k: now[k] - self.reported.get(k, 0) for k in now}
        self.reported = now
        delta["cost_usd"], self.reported_cost = s.cost_usd - self.reported_cost, s.cost_usd
        delta["cache_saved_usd"], self.reported_saved = s.cache_saved_usd - self.reported_saved, s.cache_saved_usd
        return delta


def _headers(cfg: Config, secret_headers: Secret | None) -> dict[str, str]:
    """The request headers; secret values come from the driver's environment (registered with the
    scrubber in this process too, so a server echoing them cannot get them into an answer)."""
    if secret_headers is None:
        return cfg.endpoint.request_headers()
    return {**cfg.endpoint.public_headers(), **{k: redact.register(v) for k, v in secret_headers.reveal().items()}}


class ShardWorker:
    """`ds.map_batches(ShardWorker, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=run.workers))`
    over (shard index, shard name) rows."""

    def __init__(self, wiring: Wiring, shards: ShardInput) -> None:
        self.wiring, self.shards = wiring, shards
        self.cfg = wiring.config()
        self.source, self.retry_failed = shards.source, shards.retry_failed
        self.row_map: RowMap | None = None
        self.capture = LineCapture.install()
        self.renderer = Renderer(self.cfg, input_dir=shards.input_dir, columns=shards.columns)
        self.sender: Sender | None = None
        self._tmp = tempfile.mkdtemp(prefix="pipeline-ray-")

    def _sender(self) -> Sender:
        if self.sender is None:  # on the actor's loop, on first use
            self.sender = Sender(self.cfg, self.wiring, self.renderer)
        return self.sender

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [await self._shard(int(s), str(n)) for s, n in zip(batch["shard"], batch["name"])]
        return {k: [r[k] for r in rows] for k in rows[0]}

    async def _shard(self, shard: int, name: str) -> dict[str, Any]:
        sender = self._sender()
        core = sender.core
        out: dict[str, Any] = {"shard": shard, "name": name, "rows": 0, "ok": 0, "failed": 0, "pending": 0,
                               "reused": 0, "new": 0, "edited": 0, "input_failed": 0, "published": False,
                               "ids": b""}
        inp = await asyncio.to_thread(self._read, shard)
        out["rows"] = len(inp.rows)
        if core.stop_reason:  # this worker stopped (run-fatal): the shard stays to do
            out["pending"] = len(inp.rows)
        else:
            hashes = id_hashes(inp.ids)
            donors, seen = await asyncio.to_thread(self._donors, hashes)
            result, out["reused"] = await sender.answer(inp, self.retry_failed, name, donors)
            out["pending"] = sum(1 for o in result.outcomes if o is None)
            out.update(_row_counts(result.keys, sender.last_known, seen))
            if result.complete:
                out["ok"], out["failed"] = await asyncio.to_thread(self._publish, result, sender.plan, name)
                out["published"], out["ids"] = True, hashes.tobytes()
        out["stop"] = core.stop_reason or ""
        out["message"] = str(core.fatal or "")
        out.update(sender.stats_delta())
        out["log"] = self.capture.take()
        return out

    def _read(self, shard: int) -> InputBatch:
        return next(self.source.batches(skip=lambda b: b != shard))

    def _donors(self, hashes: np.ndarray) -> tuple[set[str], np.ndarray]:
        """The shards whose journal folders hold answers to some of these rows (an earlier version of
        this shard, or the shards its rows were in before rows moved)."""
        if self.row_map is None:
            import ray
            ref = self.shards.row_map  # shared by every worker, zero-copy
            self.row_map = ray.get(ref[0]) if ref else RowMap()
        return self.row_map.donors(hashes), self.row_map.seen(hashes)

    def _publish(self, result: OutcomeBatch, plan: StructuredPlan | None, shard: str) -> tuple[int, int]:
        """Both parts of a finished shard, failures first: a results part marks the shard done."""
        columns = make_layout(self.cfg, plan)
        results, failures = result.tables(columns)
        opts, root, name = self.cfg.output.storage_options, self.cfg.output.dir, part_name(shard)
        compression = None if columns.compression == "none" else columns.compression
        for table, folder in ((failures, FAILURES), (results, RESULTS)):
            local = os.path.join(self._tmp, f"{folder}-{name}")
            pq.write_table(table, local, compression=compression)
            storage.put_file(local, storage.join(root, folder, name), opts, root=root)
            os.unlink(local)
        return results.num_rows, failures.num_rows


def worker_id() -> str:
    """The Ray actor's id (the same across Ray's restarts of it: the budget learns that the earlier
    incarnation died), else a random one."""
    try:
        import ray
        actor = ray.get_runtime_context().get_actor_id()
    except Exception:
        actor = None
    return actor or uuid.uuid4().hex


def _row_counts(keys: list[str | None], known: dict[str, Record], seen: np.ndarray) -> dict[str, int]:
    """The local engine's row accounting (core/finish.py RowCount) for one shard: input-failed (no request),
    reused (answered before), edited (asked anew for a row the job had answered before: its id is in the
    row map) and new."""
    out = {"input_failed": 0, "reused": 0, "edited": 0, "new": 0}
    for key, before in zip(keys, seen):
        if key is None:
            out["input_failed"] += 1
        elif key in known:
            out["reused"] += 1
        elif before:
            out["edited"] += 1
        else:
            out["new"] += 1
    return out
