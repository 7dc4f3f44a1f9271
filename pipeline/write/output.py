"""Results, failures and the summary, written so that every input row lands exactly once.

Each input batch, once all its rows are resolved, becomes two part files (`parts/NAME.f.parquet`
then `parts/NAME.r.parquet`, NAME being the batch's content name (common/parts.py part_names), each
written to a temp file and renamed; the results part is the batch's completion mark). A later run
reuses the part of an unchanged batch without rendering it. At the end (and on interruption) the parts
of this run's batches are concatenated in input order into `results.parquet` and `failures.parquet`,
again via temp file + rename, so readers never see a torn file and an interrupted merge leaves the
previous outputs intact.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..common import redact, safefs
from ..common.layout import FAILURES, RESULTS
from ..common.parts import done_parts, read_part
from ..config import Config
from ..read import storage
from ..send.confidence import choice_fields, compared_fields
from ..vocab import Record, RowFailure
from .schema_arrow import arrow_type, to_arrow

if TYPE_CHECKING:
    import polars as pl

LOGPROB_TYPE = pa.list_(pa.struct([
    ("token", pa.string()), ("logprob", pa.float64()),
    ("top_logprobs", pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))),
]))


@dataclass
class OutputColumns:
    """Which columns the outputs have; fixed for a job so every part has the same shape."""

    id_column: str
    schema: dict[str, Any] | None
    with_tool_calls: bool = False
    with_logprobs: bool = False
    with_ttft: bool = False
    compression: str = "zstd"
    # Trusting the labels (quality / cascade): None or False where the feature is off, so the columns exist
    # only where it is on. `decisions` (thresholds, the audit's sample) shapes the parts' content too.
    confidence_fields: list[str] | None = None   # confidence, confidence_by_field (one float per field)
    cascade: bool = False                        # cascade_stage
    audit_fields: list[str] | None = None        # audit_agrees (one bool per compared field)
    decisions: dict[str, Any] | None = None

    # The configured model has no known price: an answer whose server reported no usage.cost cost an
    # unknown amount, written as null (0.0 would claim it was free). Cache hits cost nothing now.
    cost_unknown: bool = False

    def cost(self, r: Record) -> float | None:
        return None if self.cost_unknown and not r.cost_usd and not r.cache_hit else r.cost_usd

    def output_type(self) -> pa.DataType | None:
        return arrow_type(self.schema) if self.schema is not None else None


def write_part(
    parts_dir: Path,
    name: str,
    layout: OutputColumns,
    carried: pa.Table,
    outcomes: Sequence[Record | RowFailure | None],
) -> tuple[int, int]:
    """Write one batch's results and failures parts; returns (succeeded, failed).

    With rows still pending (None: the run stopped before they had an answer) the parts are *partial*:
    the outputs show what is done, and a resume replaces them with the batch's complete parts.
    """
    results, failures = part_tables(layout, carried, outcomes)
    partial = any(o is None for o in outcomes)
    stem = parts_dir / name
    r, f = ("pr", "pf") if partial else ("r", "f")
    _atomic_parquet(failures, Path(f"{stem}.{f}.parquet"), layout.compression)
    _atomic_parquet(results, Path(f"{stem}.{r}.parquet"), layout.compression)
    if not partial:
        for stale in (Path(f"{stem}.pr.parquet"), Path(f"{stem}.pf.parquet")):
            stale.unlink(missing_ok=True)
    return results.num_rows, failures.num_rows


def part_tables(layout: OutputColumns, carried: pa.Table,
                outcomes: Sequence[Record | RowFailure | None]) -> tuple[pa.Table, pa.Table]:
    """One batch's results and failures rows (pending rows, None, in neither), carried columns joined."""
    ok_idx = [i for i, o in enumerate(outcomes) if isinstance(o, Record) and o.state == "ok"]
    ok_set = set(ok_idx)
    bad_idx = [i for i, o in enumerate(outcomes) if o is not None and i not in ok_set]
    carried = _rename_carried(carried, layout)
    results = _results_table(carried.take(pa.array(ok_idx, pa.int64())),
                             [outcomes[i] for i in ok_idx], layout)  # type: ignore[misc]
    failures = _failures_table(carried.take(pa.array(bad_idx, pa.int64())),
                               [outcomes[i] for i in bad_idx], layout)  # type: ignore[misc]
    return results, failures


def _rename_carried(carried: pa.Table, layout: OutputColumns) -> pa.Table:
    reserved = set(RESULT_COLUMNS) | {"output", "error_class", "status", "message", "ttft_s", "tool_calls", "logprobs"}
    reserved |= set(QUALITY_COLUMNS)
    names = []
    for name in carried.column_names:
        if name == "__id":
            names.append(layout.id_column)
        elif name in reserved or name == layout.id_column:
            names.append(f"input.{name}")  # an input column must never shadow one of ours
        else:
            names.append(name)
    return carried.rename_columns(names)


QUALITY_COLUMNS = ["confidence", "confidence_by_field", "cascade_stage", "audit_agrees"]
RESULT_COLUMNS = [
    "content", "finish_reason", "model", "provider", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
    "latency_s", "attempts", "cache_hit", "request_key",
]


def _results_table(carried: pa.Table, recs: list[Record], layout: OutputColumns) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    out_type = layout.output_type()
    if out_type is not None and layout.schema is not None:
        values = [orjson.loads(r.output_json) if r.output_json else None for r in recs]
        cols["output"] = to_arrow(values, layout.schema, out_type)
    cols["content"] = pa.array([r.content for r in recs], pa.string())
    cols["finish_reason"] = pa.array([r.finish_reason for r in recs], pa.string())
    cols["model"] = pa.array([r.model for r in recs], pa.string())
    cols["provider"] = pa.array([r.provider for r in recs], pa.string())
    cols["prompt_tokens"] = pa.array([r.prompt_tokens for r in recs], pa.int64())
    cols["completion_tokens"] = pa.array([r.completion_tokens for r in recs], pa.int64())
    cols["cached_tokens"] = pa.array([r.cached_tokens for r in recs], pa.int64())  # of prompt_tokens, from the cache
    cols["cost_usd"] = pa.array([layout.cost(r) for r in recs], pa.float64())
    cols["latency_s"] = pa.array([r.latency_s for r in recs], pa.float64())
    cols["attempts"] = pa.array([r.attempts for r in recs], pa.int64())
    cols["cache_hit"] = pa.array([bool(r.cache_hit) for r in recs], pa.bool_())
    cols["request_key"] = pa.array([r.key for r in recs], pa.string())
    if layout.with_ttft:
        cols["ttft_s"] = pa.array([r.ttft_s for r in recs], pa.float64())
    if layout.with_tool_calls:
        cols["tool_calls"] = pa.array([r.tool_calls_json for r in recs], pa.string())
    cols.update(_quality_columns(recs, layout))
    if layout.with_logprobs:
        cols["logprobs"] = pa.array([orjson.loads(r.logprobs_json) if r.logprobs_json else None for r in recs],
                                    LOGPROB_TYPE)
    table = carried
    for name, arr in cols.items():
        table = table.append_column(name, arr)
    return table


def _quality_columns(recs: list[Record], layout: OutputColumns) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    if layout.confidence_fields is not None:
        cols["confidence"] = pa.array([r.confidence for r in recs], pa.float64())
    if layout.confidence_fields:
        by_field = pa.struct([(name, pa.float64()) for name in layout.confidence_fields])
        cols["confidence_by_field"] = pa.array(
            [_pick(r.confidence_json, layout.confidence_fields) for r in recs], by_field)
    if layout.cascade:
        cols["cascade_stage"] = pa.array([getattr(r, "cascade_stage", None) for r in recs], pa.int64())
    if layout.audit_fields is not None:
        agrees = pa.struct([(name, pa.bool_()) for name in layout.audit_fields])
        cols["audit_agrees"] = pa.array([_pick(getattr(r, "audit_json", None), layout.audit_fields) for r in recs],
                                        agrees)
    return cols


def _pick(raw: str | None, names: list[str]) -> dict[str, Any] | None:
    """A JSON object's values for `names` (missing ones null), or null for no object."""
    value = orjson.loads(raw) if raw else None
    if not isinstance(value, dict):
        return None
    return {name: value.get(name) for name in names}


def _failures_table(carried: pa.Table, outcomes: list[Record | RowFailure], layout: OutputColumns) -> pa.Table:
    def get(o: Record | RowFailure, name: str) -> Any:
        return getattr(o, name, None)

    table = carried.select([layout.id_column]) if carried.num_columns else carried
    cols = {
        "error_class": pa.array([o.error_class for o in outcomes], pa.string()),
        "status": pa.array([get(o, "status") for o in outcomes], pa.int64()),
        "message": pa.array([redact.scrub_any(o.message) for o in outcomes], pa.string()),
        "attempts": pa.array([get(o, "attempts") or 0 for o in outcomes], pa.int64()),
        "content": pa.array([redact.scrub_any(get(o, "content")) for o in outcomes], pa.string()),
        "cost_usd": pa.array([get(o, "cost_usd") or 0.0 for o in outcomes], pa.float64()),
        "request_key": pa.array([get(o, "key") for o in outcomes], pa.string()),
    }
    for name, arr in cols.items():
        table = table.append_column(name, arr)
    # The carried input columns after ours: enough context to act on a failure in a notebook.
    for name in carried.column_names:
        if name != layout.id_column:
            table = table.append_column(name, carried.column(name))
    return table


def _atomic_parquet(table: pa.Table, path: Path, compression: str) -> None:
    with safefs.atomic_writer(path) as fh:  # never through a link planted in the output folder
        pq.write_table(table, fh, compression=None if compression == "none" else compression)


def merge_parts(parts_dir: Path, out_dir: Path, compression: str, names: list[str]) -> tuple[int, int]:
    """Concatenate the parts of `names` (this run's batches, in input order) into results.parquet and
    failures.parquet (bounded memory); a batch without a part yet is pending and left out."""
    complete = done_parts(parts_dir)
    counts = []
    for kind, name in (("r", RESULTS), ("f", FAILURES)):
        files = [parts_dir / f"{n}.{kind if n in complete else 'p' + kind}.parquet" for n in names]
        counts.append(_concat([f for f in files if os.path.lexists(f)], out_dir / name, compression))
    return counts[0], counts[1]


def output_ids(out_dir: Path, id_column: str) -> list[pa.ChunkedArray]:
    """The ids in the current results and failures (read before a merge replaces them)."""
    out = []
    for name in (RESULTS, FAILURES):
        fh = safefs.open_read(out_dir / name)  # a link planted there is replaced by the merge, never read
        if fh is None:
            continue
        with fh:
            try:
                pf = pq.ParquetFile(fh)
                if id_column in pf.schema_arrow.names:
                    out.append(pf.read(columns=[id_column]).column(0))
            except (pa.ArrowException, OSError):
                continue  # damaged, or not a Parquet file of ours: the merge replaces it; no ids to count as removed
    return out


def _concat(files: list[Path], dest: Path, compression: str) -> int:
    if not files:
        dest.unlink(missing_ok=True)  # no row of this input is done yet: the outputs hold none
        return 0
    schemas = [read_part(f, pq.read_schema) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    rows = 0
    with safefs.atomic_writer(dest) as fh, \
            pq.ParquetWriter(fh, schema, compression=None if compression == "none" else compression) as writer:
        for f in files:
            table = read_part(f, pq.read_table)
            if table.num_rows:
                writer.write_table(_conform(table, schema))
                rows += table.num_rows
    return rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema.equals(schema):
        return table
    cols = []
    for fld in schema:
        if fld.name in table.column_names:
            cols.append(table.column(fld.name).cast(fld.type))
        else:
            cols.append(pa.nulls(table.num_rows, fld.type))
    return pa.Table.from_arrays(cols, schema=schema)


def quality_layout(cfg: Config, schema: dict[str, Any] | None) -> dict[str, Any]:
    """OutputColumns' quality fields for a job (the local runner and the Ray workers agree on them)."""
    q, cascade = cfg.quality, cfg.cascade
    decisions: dict[str, Any] = {}
    if cascade:
        decisions["cascade"] = [[s.model, s.min_confidence] for s in cascade]
    if q.audit is not None:
        decisions["audit"] = q.audit.model_dump()
    return {"confidence_fields": list(choice_fields(schema)) if q.confidence != "off" else None,
            "cascade": bool(cascade), "audit_fields": compared_fields(schema) if q.audit is not None else None,
            "decisions": decisions or None}


@dataclass
class Summary:
    """What a run did; `summary.json` is this object, and the CLI only formats it."""

    out_dir: str
    rows_total: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    run_cost_usd: float = 0.0
    wall_s: float = 0.0
    requests_sent: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    failures_by_class: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    deduplicated: int = 0
    # The provider's prompt cache over the job: cached_tokens and cache_write_tokens (parts of
    # prompt_tokens), hit_share (cached / prompt tokens), saved_usd (against the full input price),
    # run_cached_tokens and run_saved_usd (this invocation).
    prompt_cache: dict[str, Any] = field(default_factory=dict)
    resumed_rows: int = 0
    # Where this input's rows stand; new + edited + retried + reused + input_failed = rows_total.
    rows_new: int = 0        # rows whose request had no answer before this run (sent, or still pending)
    rows_edited: int = 0     # rows the previous outputs held whose request is new (the row changed)
    rows_retried: int = 0    # rows whose request had a failed answer, asked again (--retry-failed, transient)
    rows_reused: int = 0     # rows whose request was answered by an earlier run (no cost now)
    rows_input_failed: int = 0  # rows that never became a request (failures with error_class input)
    rows_removed: int = 0    # rows of the previous outputs no longer in the input (answers kept in the store)
    stopped: str | None = None
    stop_message: str | None = None
    next_step: str | None = None
    exit_code: int = 0
    config_fingerprint: str = ""
    structured: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)  # confidence, cascade stages, audit, gate (write/quality.py)
    versions: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    started_at: str = ""     # UTC ISO-8601
    finished_at: str = ""

    def to_json(self) -> bytes:
        return redact.scrub_bytes(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))


def write_json_atomic(path: Path, data: bytes) -> None:
    safefs.write_atomic(path, data)


def failure_counts(out_dir: Path) -> dict[str, int]:
    fh = safefs.open_read(out_dir / FAILURES)
    if fh is None:
        return {}
    with fh:
        classes = pq.read_table(fh, columns=["error_class"]).column("error_class")
    counts = pc.value_counts(classes)
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def load(out_dir: str | os.PathLike[str], *, include_failures: bool = False, unnest: bool = True) -> pl.DataFrame:
    """The results as a polars DataFrame: input columns, output fields as columns, usage columns.

    Output fields are unnested to top-level columns, prefixed with `output_` only where a name is
    already taken. With include_failures=True, failure rows are appended (their output columns null)
    with their error_class, status and message.
    """
    import polars as pl  # here: a run never needs polars (26 MB resident), only reading results back does

    out = Path(out_dir)
    path = out / "results.parquet"
    remote = storage.is_remote(str(out_dir))
    if not remote and not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `pipeline run CONFIG` first (or check the folder)")
    df = read_outputs(str(out_dir), "results.parquet")
    if unnest and "output" in df.columns and isinstance(df.schema["output"], pl.Struct):
        taken = set(df.columns) - {"output"}
        fields = [f.name for f in df.schema["output"].fields]
        renamed = {f: (f"output_{f}" if f in taken else f) for f in fields}
        df = df.with_columns(pl.col("output").struct.rename_fields([renamed[f] for f in fields])).unnest("output")
    if include_failures and (remote or (out / "failures.parquet").exists()):
        failures = read_outputs(str(out_dir), "failures.parquet").drop(["content", "cost_usd", "attempts"],
                                                                       strict=False)
        df = pl.concat([df, failures], how="diagonal_relaxed")
    return df


def read_outputs(out_dir: str, name: str, options: dict[str, Any] | None = None) -> pl.DataFrame:
    """results.parquet / failures.parquet of either layout: the local engine's one file, or the Ray
    engine's folder of per-shard parts (`name/part-*.parquet`, in a local folder or on s3:// / gs://)."""
    import polars as pl  # reading results back only (see load)

    uri = storage.join(out_dir, name)
    if not storage.is_remote(uri) and os.path.isfile(uri):
        return pl.read_parquet(uri)
    frames = []
    for part in storage.list_files(uri, options):
        base = part.rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".parquet"):
            frames.append(pl.read_parquet(io.BytesIO(storage.read_bytes(part, options))))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
