"""`pipeline show OUT_DIR ROW_ID`: one row's whole story — request as sent, attempts, raw answer, output, cost.

The store keeps answers, not request bodies (a body is ~1-2 KB; keeping one per row would add a
gigabyte to a 1M-row store for a view used on a handful of rows). The body is instead re-rendered with
the runner's own builder (`RequestBuilder.build_batch`) from the job's config and the input row, and then
*proved*: the request key is sha256(base_url, body), so when the re-rendered key equals the key stored with the
answer, the body shown is byte for byte the one that was sent. When it does not (the config file or the
input changed since), the body is shown marked as unverified, never passed off as the real one.

Config candidates, first match of the job fingerprint wins: --config, the command recorded in the
manifest (config path plus its --set items), the manifest's config path, and the job's stored identity
(the manifest's request and input sections), so a config file that changed or is gone is not needed.
The API key and the secret headers are never read: the Authorization header and every
endpoint.secret_headers entry are shown redacted.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
import polars as pl

from ..common import redact
from ..common.terminal import printable
from ..errors import ConfigError, InputError, PipelineError, UsageError
from ..state.store import Store
from ..vocab import Record
from .data import damaged_output, id_column, read_log, read_manifest, read_output

REDACTED = "Bearer [redacted]"
_DATA_URL_KEEP = 80


@dataclass
class RowStory:
    row_id: str
    out_dir: str
    outcome: str                                  # succeeded | failed | pending
    row: dict[str, Any]                           # the results / failures row (without the raw content)
    request: dict[str, Any] | None = None        # url, headers, body, key, verified, note
    record: dict[str, Any] | None = None         # the stored final record (raw decoded)
    attempts: list[dict[str, Any]] = field(default_factory=list)


def row_story(out_dir: str, row_id: str, *, config: str | None = None) -> RowStory:
    path = Path(out_dir)
    manifest = read_manifest(path)
    if not manifest:
        raise UsageError(f"{path} has no manifest.json: give a job's output.dir")
    id_col = id_column(path, manifest)
    outcome, row = _find_row(path, id_col, row_id)
    story = RowStory(row_id, str(path), outcome, row)
    key = row.get("request_key")
    if key:
        story.record = _stored(path, key)
    story.request = _request(path, manifest, row_id, key, config)
    keys = {k for k in (key, (story.request or {}).get("key")) if k}
    events, _ = read_log(path)
    story.attempts = [e for e in events if e.get("event") == "attempt_failed" and e.get("key") in keys]
    return story


def _find_row(path: Path, id_col: str, row_id: str) -> tuple[str, dict[str, Any]]:
    for name, outcome in (("results.parquet", "succeeded"), ("failures.parquet", "failed")):
        f = path / name
        if not f.exists():
            continue
        try:
            lf = read_output(f).lazy() if f.is_dir() else pl.scan_parquet(f)  # a Ray job: a folder of parts
            if id_col not in lf.collect_schema().names():
                continue
            hit = lf.filter(pl.col(id_col).cast(pl.String) == row_id).head(1).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise UsageError(damaged_output(f, exc)) from None
        if hit.height:
            return outcome, hit.row(0, named=True)
    raise UsageError(f"no row with {id_col} = {row_id!r} in {path}/results.parquet or failures.parquet "
                     "(a pending row has no answer yet: `pipeline status` shows how many)")


def _stored(path: Path, key: str) -> dict[str, Any] | None:
    store_path = path / "store.sqlite"
    if not store_path.exists():
        return _journaled(path, key)
    store = Store(str(store_path), readonly=True)
    try:
        rec: Record | None = store.get_many([key], with_raw=True).get(key)
    finally:
        store.close()
    if rec is None:
        return None
    out = asdict(rec)
    raw = out.pop("raw")
    out["raw"] = _decode(raw)
    return out


def _request(path: Path, manifest: dict[str, Any], row_id: str, key: str | None, config: str | None
             ) -> dict[str, Any] | None:
    """The request re-rendered with the runner's builder, and whether its key proves it is the one sent."""
    cfg = job_config(path, manifest, config)
    if cfg is None:
        return {"note": "the job's config could not be rebuilt (pass --config CONFIG)", "verified": False}
    from ..prepare.prompts import Renderer
    from ..prepare.structured import plan_for
    from ..read.reader import Source

    try:
        source = Source(cfg.input)
        scan = source.scan()
        renderer = Renderer(cfg, input_dir=str(Path(source.files[0]).parent) if source.files else None,
                            columns=scan.columns)
        plan = plan_for(cfg)
        for batch in source.batches():
            if row_id in batch.ids:
                i = batch.ids.index(row_id)
                return _matching_body(batch, i, renderer, plan, cfg, key)
    except (InputError, ConfigError) as exc:
        return {"note": f"the input row could not be read again: {exc}", "verified": False}
    return {"note": f"row {row_id!r} is no longer in the input {cfg.input.path}", "verified": False}


def _matching_body(batch: Any, i: int, renderer: Any, plan: Any, cfg: Any, key: str | None) -> dict[str, Any]:
    """Render under each structured mode the run may have used (the learned one first) until the key matches."""
    from ..prepare.packs import Packer
    from ..prepare.request import RequestBuilder

    modes = [plan.mode, *[m for m in plan.modes if m != plan.mode]] if plan is not None else [None]
    first: dict[str, Any] | None = None
    for mode in modes:
        if plan is not None:
            plan.mode = mode
        built = RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens).build_batch(batch, renderer)
        packer = Packer.of(cfg, plan, renderer.tokens)
        if packer is not None:
            built = Packer.rekey(built)
        outcomes, keys, jobs = built.failures, built.keys, built.requests
        rendered_key = keys[i]
        if rendered_key is None:
            return {"note": f"the row does not render: {getattr(outcomes[i], 'message', '')}", "verified": False}
        sent = jobs[rendered_key] if packer is None else packer.pack([jobs[rendered_key]]).request
        assert sent is not None  # a pack the packer built has its request
        job = sent
        shown = {"method": "POST", "url": _url(cfg.endpoint.base_url),
                 "headers": {"Authorization": REDACTED, **cfg.endpoint.public_headers(),
                             **{name: "[redacted]" for name in cfg.endpoint.secret_headers}},
                 "body": _short_data_urls(orjson.loads(job.payload)), "key": keys[i], "mode": mode}
        if key is None or keys[i] == key:
            note = ("re-rendered; its request key equals the stored one, so this is the exact body sent"
                    if key else "re-rendered (the row failed before a request was made)")
            if packer is not None and key:
                note = ("re-rendered; its request key equals the stored one. It was sent in a pack of up to "
                        f"{packer.k} rows (prompt.rows_per_request), shown here as a pack of this row alone")
            return {**shown, "verified": key is not None, "note": note}
        first = first or shown
    assert first is not None
    return {**first, "verified": False,
            "note": "re-rendered, but its key differs from the stored one: the config or the input changed since "
                    "this row was sent, so this is NOT necessarily the body that was sent"}


def job_config(path: Path, manifest: dict[str, Any], config: str | None) -> Any:
    """The first config that rebuilds the job (its fingerprint matches), or None."""
    return next(job_configs(path, manifest, config), None)


def job_configs(path: Path, manifest: dict[str, Any], config: str | None) -> Iterator[Any]:
    """Every candidate config that rebuilds the job, best first. Several can match: the config file the
    manifest names may since point at another input than the one the job read."""
    from ..config import load_config

    candidates: list[tuple[Any, list[str]]] = []
    if config:
        candidates.append((config, []))
    command = manifest.get("command")
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = []
        if len(argv) >= 3 and argv[:2] == ["pipeline", "run"]:
            candidates.append((argv[2], [argv[j + 1] for j, a in enumerate(argv[:-1]) if a == "--set"]))
    if isinstance(manifest.get("config"), str):
        candidates.append((manifest["config"], []))
    if isinstance(manifest.get("request"), dict) and isinstance(manifest.get("input"), dict):
        # The job's stored identity and input: the config file may have changed since, or be gone.
        candidates.append(({**manifest["request"], "input": manifest["input"], "output": {"dir": str(path)}}, []))
    for source, overrides in candidates:
        try:
            cfg = load_config(source, overrides)
        except PipelineError:
            continue
        if cfg.request_fingerprint() == manifest.get("fingerprint") or source is config:
            yield cfg


def _url(base_url: str) -> str:
    return "(the built-in simulator)/chat/completions" if base_url == "simulator" \
        else f"{base_url.rstrip('/')}/chat/completions"


def _short_data_urls(value: Any) -> Any:
    """Inline images are megabytes of base64: show their head and size, not all of it."""
    if isinstance(value, dict):
        return {k: _short_data_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_data_urls(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > _DATA_URL_KEEP * 2:
        return f"{value[:_DATA_URL_KEEP]}… ({len(value):,} characters)"
    return value


def _decode(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def print_story(story: RowStory, out: TextIO | None = None, *, as_json: bool = False) -> int:
    out = out or sys.stdout
    if as_json:
        out.write(orjson.dumps(asdict(story), option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return 0
    sink = out

    def w(text: str) -> None:
        # The raw answer and the messages are the server's text (and the request may hold a secret value of
        # the config): scrubbed, and shown on the terminal with control characters spelled out, never obeyed.
        sink.write(redact.scrub(printable(text, lines=True)))

    w(f"row {story.row_id} in {story.out_dir}: {story.outcome}\n")
    req = story.request or {}
    w(f"\n== request  {req.get('method', 'POST')} {req.get('url', '?')}\n")
    for name, value in (req.get("headers") or {}).items():
        w(f"{name}: {value}\n")
    w(f"({req.get('note')})\n")
    if req.get("body") is not None:
        w(_pretty(req["body"]) + "\n")
    w("\n== attempts\n")
    for e in story.attempts:
        retry = f"retry in {e.get('retry_in_s')}s" if e.get("retry_in_s") is not None else "final"
        w(f"  attempt {e.get('attempt')}  {e.get('ts')}  status {e.get('status')}  {e.get('error_class')}  {retry}\n")
    if not story.attempts:
        w("  (no failed attempts in pipeline.log)\n")
    rec = story.record or {}
    if rec:
        latency = f"{rec['latency_s']:.3f}s" if rec.get("latency_s") is not None else "–"
        stored = (datetime.fromtimestamp(rec["created_at"], UTC).isoformat(timespec="milliseconds")
                  if rec.get("created_at") else "–")
        w(f"  final: {rec.get('state')}, status {rec.get('status')}, {rec.get('attempts')} attempt(s), "
          f"latency {latency}, stored at {stored}\n")
    w("\n== response (raw, as stored)\n" + (_pretty(rec.get("raw")) if rec.get("raw") is not None else "(none stored)"))
    w("\n\n== output (parsed)\n")
    w(_pretty(story.row.get("output") if story.outcome == "succeeded" else
              {k: story.row.get(k) for k in ("error_class", "status", "message")}) + "\n")
    w(f"\n== cost\n  {story.row.get('prompt_tokens', rec.get('prompt_tokens'))} prompt + "
      f"{story.row.get('completion_tokens', rec.get('completion_tokens'))} completion tokens, "
      f"${float(story.row.get('cost_usd') or 0):.6f}\n")
    return 0


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


def _journaled(path: Path, key: str) -> dict[str, Any] | None:
    """A Ray job's record of `key` from its journal (segments keep no raw body)."""
    for segment in sorted((path / "_journal").glob("*/*.parquet")):
        if not segment.is_file() or segment.is_symlink():
            continue
        hit = pl.read_parquet(segment).filter(pl.col("key") == key)
        if hit.height:
            out = hit.row(0, named=True)
            out["raw"] = None
            return out
    return None
