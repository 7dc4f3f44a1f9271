"""One output folder read for the report: summary, manifest, outputs, store timings, log and history.

Everything here is read-only and tolerant of what a folder may lack: a job that never finished has no
summary.json, an older one no pipeline.log or history.jsonl, a job without a schema no `output` struct.
The folder is untrusted (it may be shared): a malformed log or history line is skipped and counted, never
executed or trusted beyond its JSON value, and every string from it is escaped when the HTML is built.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from ..errors import UsageError
from ..state.store import connect

# The raw answer text is most of results.parquet and the report never shows a successful row's raw text.
_BULKY = ("content", "logprobs", "tool_calls")
_LOG_BACKUPS = 9  # pipeline.log rotates by size into .1, .2 ...; read more than are kept, oldest first
# Store columns the report needs; `raw` and the content stay on disk (a 1M-row store is ~1 GB).
_TIMING_COLUMNS = ["key", "state", "attempts", "status", "error_class", "latency_s", "created_at", "cache_hit",
                   "cost_usd"]


@dataclass
class RunData:
    """What one output folder holds, as plain dicts and polars frames."""

    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    results: pl.DataFrame
    failures: pl.DataFrame
    timings: pl.DataFrame
    events: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    @property
    def id_column(self) -> str:
        return id_column(self.path, self.manifest)

    @property
    def model(self) -> str:
        return str(self.manifest.get("model") or _first(self.results, "model") or "?")

    @property
    def label(self) -> str:
        """How the run is named in tables: the model, with the folder when that alone is ambiguous."""
        return f"{self.model} ({self.path.name})"

    @property
    def schema(self) -> dict[str, Any] | None:
        structured = (self.manifest.get("request") or {}).get("structured") or {}
        schema = structured.get("schema")
        return schema if isinstance(schema, dict) else None

    def outputs(self) -> pl.DataFrame:
        """The typed output fields as top-level columns (struct unnested), or an empty frame."""
        if "output" not in self.results.columns or not isinstance(self.results.schema["output"], pl.Struct):
            return pl.DataFrame()
        return self.results.select(pl.col("output")).unnest("output")

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


def load_run(out_dir: str | Path) -> RunData:
    path = Path(out_dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder: give a job's output.dir (where results.parquet is)")
    manifest = read_manifest(path)
    summary = _read_json(path / "summary.json")
    if not manifest and not summary and not (path / "results.parquet").exists():
        raise UsageError(f"{path} holds no job (no manifest.json, summary.json or results.parquet); "
                         "give a job's output.dir")
    events, bad_log = read_log(path)
    history, bad_history = _read_jsonl(path / "history.jsonl")
    return RunData(
        path=path, summary=summary, manifest=manifest,
        results=read_output(path / "results.parquet", skip=_BULKY), failures=read_output(path / "failures.parquet"),
        timings=read_timings(path / "store.sqlite") if (path / "store.sqlite").exists() else journal_timings(path),
        events=events, history=history,
        skipped_lines=bad_log + bad_history,
    )


def id_column(path: Path, manifest: dict[str, Any]) -> str:
    """The job's row id column: from the manifest when it records the input settings, else the outputs'
    first column (both Parquet files start with it)."""
    request = manifest.get("request") or {}
    named = (request.get("input") or {}).get("id_column") if isinstance(request.get("input"), dict) else None
    if named:
        return str(named)
    for name in ("results.parquet", "failures.parquet"):
        if (path / name).is_dir():  # the Ray engine's folder of parts
            columns = read_output(path / name).columns
        elif (path / name).exists():
            try:
                columns = pl.scan_parquet(path / name).collect_schema().names()
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise UsageError(damaged_output(path / name, exc)) from None
        else:
            continue
        if columns:
            return columns[0]
    return "id"


def read_timings(store_path: Path) -> pl.DataFrame:
    """Per stored response: state, attempts, status, latency and when it was committed (not the body)."""
    schema = {"key": pl.String, "state": pl.String, "attempts": pl.Int64, "status": pl.Int64,
              "error_class": pl.String, "latency_s": pl.Float64, "created_at": pl.Float64,
              "cache_hit": pl.Boolean, "cost_usd": pl.Float64}
    if not store_path.exists():
        return pl.DataFrame(schema=schema)
    # Read-only through the WAL: a run writing this store right now is neither blocked nor disturbed.
    db = connect(str(store_path), "ro", timeout=30)
    try:
        rows = db.execute(f"SELECT {', '.join(_TIMING_COLUMNS)} FROM responses").fetchall()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{store_path} cannot be read as an answer store ({exc}); is it a job's store.sqlite?"
                         ) from None
    finally:
        db.close()
    columns: list[Any] = list(zip(*rows)) if rows else [[] for _ in _TIMING_COLUMNS]
    data = {name: list(values) for name, values in zip(_TIMING_COLUMNS, columns)}
    data["cache_hit"] = [bool(v) for v in data["cache_hit"]]
    return pl.DataFrame(data, schema=schema, strict=False)


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """pipeline.log events, oldest first: the rotated files (pipeline.log.3 ... .1) before the live one."""
    events: list[dict[str, Any]] = []
    bad = 0
    for name in [f"pipeline.log.{i}" for i in range(_LOG_BACKUPS, 0, -1)] + ["pipeline.log"]:
        found, skipped = _read_jsonl(path / name)
        events += found
        bad += skipped
    return events, bad


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of the local engine, or ray-manifest.json of the Ray engine (the same job keys)."""
    return _read_json(path / "manifest.json") or _read_json(path / "ray-manifest.json")


def journal_timings(path: Path) -> pl.DataFrame:
    """The timings of a Ray job (run.engine: ray) from its journal segments, as read_timings gives them."""
    schema = {"key": pl.String, "state": pl.String, "attempts": pl.Int64, "status": pl.Int64,
              "error_class": pl.String, "latency_s": pl.Float64, "created_at": pl.Float64,
              "cache_hit": pl.Boolean, "cost_usd": pl.Float64}
    segments = sorted(p for p in (path / "_journal").glob("*/*.parquet") if p.is_file() and not p.is_symlink())
    if not segments:
        return pl.DataFrame(schema=schema)
    frames = [pl.read_parquet(p, columns=_TIMING_COLUMNS) for p in segments]
    # An answer copied into another shard's folder is one answer: keep each key's first record.
    return pl.concat(frames, how="vertical_relaxed").unique("key", keep="first", maintain_order=True).cast(
        schema, strict=False)  # type: ignore[arg-type]


def read_output(path: Path, skip: tuple[str, ...] = ()) -> pl.DataFrame:
    """An output Parquet file of the job (empty frame when absent); a damaged one is a UsageError naming it
    and saying how to get it back (the outputs are rewritten from the store), never a crash."""
    if path.is_dir():  # the Ray engine's folder of per-shard parts
        from ..write.output import read_outputs
        try:
            df = read_outputs(str(path.parent), path.name)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise UsageError(damaged_output(path, exc)) from None
        return df.drop(list(skip), strict=False) if skip else df
    if not path.exists():
        return pl.DataFrame()
    try:
        return pl.scan_parquet(path).select(pl.exclude(*skip)).collect() if skip else pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageError(damaged_output(path, exc)) from None


def damaged_output(path: Path, exc: BaseException) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"{path} cannot be read as Parquet ({reason}); it is damaged: re-run the job's command to write its "
            "outputs again from the answers in store.sqlite (nothing is asked again)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """JSON objects, one a line; lines that are not (a torn last line, a foreign edit) are counted."""
    if not path.exists():
        return [], 0
    out: list[dict[str, Any]] = []
    bad = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if isinstance(value, dict):
                out.append(value)
            else:
                bad += 1
    return out, bad


def _first(df: pl.DataFrame, column: str) -> Any:
    if column not in df.columns or df.height == 0:
        return None
    return df.get_column(column).drop_nulls().first()
