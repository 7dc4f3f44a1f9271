"""`pipeline.ray.label(ds, config)`: the labelling stage inside a user's own Ray Data pipeline.

Each block of the user's dataset comes back with output columns added (typed from the JSON Schema), under
the job's shared limits (one limiter actor per output.dir), with every answer committed to the journal in
output.dir before it is returned. A block is identified by the content hash of its row ids, so a block
Ray runs again (a worker died, lineage reconstruction) finds its answers in the journal instead of paying
again; a row that fails is a row with `error_class` set, never a failed Ray task.
"""
from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from ...config import Config
from ...prepare.prompts import Renderer
from ...read.formats import arrow_ids, digest8
from ...vocab import InputBatch, Record, RowFailure
from ...write.schema_arrow import to_arrow
from .worker import Sender, Wiring, make_layout

ORIGIN = "<ray dataset>"
_simulators: list[Any] = []  # endpoint.base_url: simulator serves this driver process until it exits
_limiters: dict[str, Any] = {}  # a handle keeps a job's limiter alive while datasets that use it may run


def block_id(ids: list[str]) -> int:
    """A stable 48-bit identity for a block's rows: its journal folder."""
    h = hashlib.sha256("\0".join(ids).encode()).digest()
    return int.from_bytes(h[:6], "big")


def label_columns(cfg: Config, sender: Sender, outcomes: list[Record | RowFailure | None]) -> dict[str, pa.Array]:
    """The columns added to every row: typed output, content, error fields, key, tokens and cost."""
    recs = [o if isinstance(o, Record) else None for o in outcomes]
    ok = [r if r is not None and r.state == "ok" else None for r in recs]
    cols: dict[str, pa.Array] = {}
    layout = make_layout(cfg, sender.plan)
    out_type = layout.output_type()
    if out_type is not None and layout.schema is not None:
        import orjson
        values = [orjson.loads(r.output_json) if r is not None and r.output_json else None for r in ok]
        cols["output"] = to_arrow(values, layout.schema, out_type)
    cols["content"] = pa.array([r.content if r else None for r in ok], pa.string())

    def error_class(o: Record | RowFailure | None) -> str | None:
        if o is None:
            return "run_fatal"  # dispatch stopped (auth, credits, budget) before this row had an answer
        return None if isinstance(o, Record) and o.state == "ok" else o.error_class

    cols["error_class"] = pa.array([error_class(o) for o in outcomes], pa.string())
    cols["error_message"] = pa.array(
        [None if error_class(o) is None else (o.message if o is not None else str(sender.core.fatal or "stopped"))
         for o in outcomes], pa.string())
    cols["request_key"] = pa.array([r.key if r else None for r in recs], pa.string())
    cols["prompt_tokens"] = pa.array([r.prompt_tokens if r else 0 for r in recs], pa.int64())
    cols["completion_tokens"] = pa.array([r.completion_tokens if r else 0 for r in recs], pa.int64())
    cols["cached_tokens"] = pa.array([r.cached_tokens if r else 0 for r in recs], pa.int64())
    cols["cost_usd"] = pa.array([r.cost_usd if r else 0.0 for r in recs], pa.float64())
    return cols


class LabelWorker:
    """`ds.map_batches(LabelWorker, batch_format="pyarrow", concurrency=run.workers)`."""

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring
        self.cfg = wiring.config()
        self.sender: Sender | None = None

    async def __call__(self, table: pa.Table) -> pa.Table:
        if self.sender is None:
            renderer = Renderer(self.cfg, input_dir=None, columns=table.column_names)
            self.sender = Sender(self.cfg, self.wiring, renderer)
        clash = [c for c in table.column_names if c in ("output", "content", "error_class", "error_message",
                                                          "request_key", "prompt_tokens", "completion_tokens",
                                                          "cached_tokens", "cost_usd")]
        if clash:
            raise ValueError(f"the dataset already has columns {clash}; rename them before pipeline.ray.label")
        rows = table.to_pylist()
        id_col = self.cfg.input.id_column
        ids = arrow_ids(table[id_col], ORIGIN, id_col) if id_col else [digest8(r).hex() for r in rows]
        batch = InputBatch(block_id(ids), rows, ids, [(ORIGIN, i) for i in range(len(rows))], [None] * len(rows),
                           pa.table({}))
        result, _ = await self.sender.answer(batch, False, f"{batch.index:012x}")
        for name, arr in label_columns(self.cfg, self.sender, result.outcomes).items():
            table = table.append_column(name, arr)
        return table


def label(ds: Any, config: Any, *, schema: Any = None) -> Any:
    """Add the labelling columns to a Ray Dataset (lazy, like every Ray Data stage)."""
    from ...config import load_config
    from .budget import read_spent
    from .driver import connect, import_ray, limiter_name, start_limiter
    ray = import_ray()
    # The dataset is the input: a job file (or dict) needs no `input` section, and its input.path is unused.
    cfg = config if isinstance(config, Config) else load_config(config, {"input.path": ORIGIN})
    schema_dict = None
    if schema is not None:
        from ...prepare.schema import from_pydantic
        schema_dict = schema if isinstance(schema, dict) else from_pydantic(schema)
        cfg = load_config(cfg, {"structured.schema": schema_dict})
    connect(ray, cfg)
    base_url = cfg.endpoint.base_url
    if base_url == "simulator":
        from pipeline_simulator import SimConfig
        from pipeline_simulator.thread import SimulatorThread
        sim = SimulatorThread(SimConfig(**cfg.endpoint.simulator_options()))
        base_url = sim.start()
        _simulators.append(sim)
    name = limiter_name(cfg)
    # The job's one budget too (budget.max_cost_usd), continuing from what the journal's budget file says.
    _limiters[name] = start_limiter(ray, cfg, read_spent(cfg.output.dir, cfg.output.storage_options) or 0.0)
    return ds.map_batches(
        LabelWorker, batch_format="pyarrow", batch_size=cfg.input.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.run.workers), num_cpus=0,
        fn_constructor_kwargs={"wiring": Wiring.of(cfg, base_url, _limiters[name], schema_dict)})
