"""`pipeline rows OUT [--failed] [--where EXPR] [-n N] [--json]`: browse a job's rows, for a terminal and
for scripts (as `llm logs` does for prompts).

Each row: its id, whether it succeeded, the carried input columns, the output fields (or the error class,
status and message of a failure) and its cost. `--where` is a SQL boolean expression over those columns
(`sentiment = 'negative' AND score < 3`), evaluated by polars: a filter, never code. `--json` writes one
JSON object per line with every value whole; the terminal view shortens long values to one line each.
The rows come from results.parquet and failures.parquet, which may hold text a server chose, so every
value shown on a terminal has its control characters escaped.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import orjson
import polars as pl

from ..common.terminal import printable
from ..errors import UsageError
from .data import _read_json, id_column, read_output

_SHOWN = 200  # characters of one value on a terminal line
_BULKY = ("content", "logprobs", "tool_calls", "request_key")


def select_rows(out_dir: str, *, failed: bool = False, where: str | None = None, n: int | None = 20
                ) -> pl.DataFrame:
    path = Path(out_dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder: give a job's output.dir (where results.parquet is)")
    frames = [] if failed else [_results(path)]
    frames.append(_failures(path))
    frames = [f for f in frames if f.height or f.width]
    if not frames:
        raise UsageError(f"{path} has no results.parquet or failures.parquet yet (pipeline status {path} "
                         "shows where the job stands)")
    df = pl.concat(frames, how="diagonal_relaxed")
    id_col = id_column(path, _read_json(path / "manifest.json"))
    if id_col in df.columns:
        df = df.select(id_col, pl.exclude(id_col))
    if where:
        df = _filter(df, where, path)
    return df.head(n) if n else df


def _results(path: Path) -> pl.DataFrame:
    df = read_output(path / "results.parquet", skip=_BULKY)
    if not df.height and not df.width:
        return df
    if "output" in df.columns and isinstance(df.schema["output"], pl.Struct):
        taken = set(df.columns) - {"output"}
        fields = [f.name for f in df.schema["output"].fields]
        df = df.with_columns(pl.col("output").struct.rename_fields(
            [f if f not in taken else f"output.{f}" for f in fields])).unnest("output")
    return df.with_columns(pl.lit("succeeded").alias("outcome"))


def _failures(path: Path) -> pl.DataFrame:
    df = read_output(path / "failures.parquet", skip=_BULKY)
    if not df.height and not df.width:
        return df
    return df.with_columns(pl.lit("failed").alias("outcome"))


def _filter(df: pl.DataFrame, where: str, path: Path) -> pl.DataFrame:
    try:
        return df.filter(pl.sql_expr(where))
    except pl.exceptions.ColumnNotFoundError as exc:
        raise UsageError(f"--where {where!r}: {_first_line(exc)}; the columns are: {', '.join(df.columns)}"
                         ) from None
    except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:
        raise UsageError(f"--where {where!r} is not a SQL condition over the rows of {path} ({_first_line(exc)}); "
                         "e.g. --where \"error_class = 'permanent'\" or --where 'score < 3'") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def print_rows(df: pl.DataFrame, out: TextIO | None = None, *, as_json: bool = False) -> int:
    out = out or sys.stdout
    if as_json:
        for row in df.iter_rows(named=True):
            out.write(orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
        return 0
    first = df.columns[0] if df.columns else "id"
    for row in df.iter_rows(named=True):
        cost = row.get("cost_usd")
        head = f"{_shown(row.get(first))}  {row.get('outcome')}  " + \
            ("cost unknown" if cost is None else f"${float(cost):.6f}")
        out.write(head + "\n")
        for name, value in row.items():
            if name in (first, "outcome", "cost_usd") or value is None:
                continue
            out.write(f"  {name}: {_shown(value)}\n")
    if not df.height:
        out.write("no rows\n")
    return 0


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    text = printable(text)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"
