"""The Python API's synchronous entry: `pipeline.run(config, **overrides)`.

It turns a config path, dict or Config plus keyword overrides (dotted paths with `__`, section dicts,
`--set` items) and a pydantic schema into one Config, and runs the local driver (engines/runner.py) to
completion. Inside an already running event loop (Jupyter) the job runs on a private loop in a worker
thread, and interrupting the cell stops it as Ctrl-C stops the CLI.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from typing import Any, cast

from ..config import Config, load_config
from ..core.context import RunFlags
from ..core.interrupt import Interrupt
from ..read.frames import frame_file
from ..write.output import Summary
from .runner import run_async

# The keywords of `run()` that are this invocation's flags (RunOptions); every other keyword overrides the config.
_RUN_FLAGS = ("retry_failed", "force_new", "quiet", "no_wait", "cancel_batches")


def run(config: str | os.PathLike[str] | dict[str, Any] | Config, *, schema: Any = None,
        set: list[str] | None = None, **kwargs: Any) -> Summary:
    """Run a job from a config path, dict or Config.

    Flags: `retry_failed`, `force_new`, `quiet`, `no_wait`, `cancel_batches` (as on the command line).
    Every other keyword overrides the config: dotted paths with `__` (`output__dir="/tmp/x"`) or section
    dicts (`limits={"max_concurrency": 8}`); `set` takes `--set` items. A pydantic model class may be given
    as `schema`, and the input as `input=` a polars/pandas DataFrame or an Arrow table (read/frames.py)
    instead of `input.path`."""
    flags = cast(RunFlags, {k: kwargs.pop(k) for k in _RUN_FLAGS if k in kwargs})  # RunFlags' keys only
    data = kwargs.get("input")
    if data is not None and not isinstance(data, dict):
        with frame_file(data) as path:
            return run(config, schema=schema, set=set, **flags, **{**kwargs, "input": {"path": path,
                                                                                      "format": "parquet"}})
    cfg, schema_dict = _run_config(config, schema, set, kwargs)
    interrupt = Interrupt()

    def coro_factory() -> Any:
        return run_async(cfg, schema=schema_dict, interrupt=interrupt, **flags)
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:  # run outside the except block: a run's own error must not be chained to "no running loop"
        return asyncio.run(coro_factory())  # Ctrl-C: KeyboardInterrupt, after the store is closed
    return _run_beside_loop(coro_factory, interrupt)


def _run_config(config: str | os.PathLike[str] | dict[str, Any] | Config, schema: Any, set: list[str] | None,
                overrides: dict[str, Any]) -> tuple[Config, dict[str, Any] | None]:
    """The config with the keyword overrides and --set items applied, and the schema given as an argument."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        else:
            flat[key.replace("__", ".")] = value
    cfg = load_config(config if not isinstance(config, os.PathLike) else str(config), set or flat or None)
    if set and flat:
        cfg = load_config(cfg, flat)
    schema_dict = None
    if schema is not None:
        from ..prepare.schema import from_pydantic
        schema_dict = schema if isinstance(schema, dict) else from_pydantic(schema)
        if cfg.structured is None:
            cfg = load_config(cfg, {"structured.schema": schema_dict})
    return cfg, schema_dict


def _run_beside_loop(coro_factory: Callable[[], Any], interrupt: Interrupt) -> Summary:
    """Inside a running loop (Jupyter): a private loop in a worker thread; block this cell until done."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as pool:
        future = pool.submit(lambda: asyncio.run(coro_factory()))
        while True:
            try:
                # Wake up now and then: a signal handled by another thread does not interrupt a blocked
                # wait, and Python runs the KeyboardInterrupt handler only when this thread runs.
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
            except KeyboardInterrupt:
                # Interrupting the cell stops the job as Ctrl-C stops the CLI (a second time: at once) and
                # returns its summary, instead of leaving it running behind the cell with the lock held.
                interrupt.trigger_threadsafe()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("schema", "headers", "extra", "simulator", "provider"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
