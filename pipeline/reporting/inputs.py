"""The input text of a few rows, for reviewers and for the report's examples: the user message the row
was sent, rendered again from the job's config and input (the results keep no prompt text).

A rendered text is only used when it is *proved*: the request rebuilt from it must have the request key
stored with the row's answer (as `pipeline show` proves a body), under one of the structured modes the
run may have used. So an input edited since, or a config whose input file is not the one the job read,
never puts another row's text next to an answer. One pass over the input, building only the rows asked
for. What cannot be proved falls back to a carried `text` column, else it is left out and the caller
says "input not available". Only the text parts of the message are kept (an image shows as [image_url]).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from ..errors import ConfigError, InputError
from ..vocab import InputBatch
from .data import RunData

TEXT_COLUMNS = ("text", "input.text")
MAX_CHARS = 4000


def input_texts(run: RunData, ids: set[str]) -> dict[str, str]:
    """Row id -> the user message it was sent (text parts), for the ids whose request can be proved."""
    if not ids:
        return {}
    found = _rendered(run, ids)
    missing = ids - set(found)
    if missing:
        found.update(_carried(run, missing))
    return found


def _expected_keys(run: RunData, ids: set[str]) -> dict[str, str]:
    res = run.results
    if "request_key" not in res.columns or res.height == 0:
        return {}
    keys = res.select(pl.col(run.id_column).cast(pl.String).alias("id"), pl.col("request_key").cast(pl.String))
    return dict(keys.filter(pl.col("id").is_in(list(ids)) & pl.col("request_key").is_not_null()).iter_rows())


def _rendered(run: RunData, ids: set[str]) -> dict[str, str]:
    """Texts proved by a rebuilt request key, trying each config that rebuilds the job in turn."""
    from .show import job_configs

    expected = _expected_keys(run, ids)
    out: dict[str, str] = {}
    for cfg in job_configs(run.path, run.manifest, None) if expected else ():
        out.update(_rendered_from(cfg, {k: v for k, v in expected.items() if k not in out}))
        if len(out) == len(expected):
            break
    return out


def _rendered_from(cfg: Any, expected: dict[str, str]) -> dict[str, str]:
    """The rows of one candidate config's input whose rebuilt request key is the stored one."""
    from ..prepare.prompts import Renderer
    from ..prepare.structured import plan_for
    from ..read.reader import Source

    out: dict[str, str] = {}
    try:
        source = Source(cfg.input)
        scan = source.scan()
        folder = str(Path(source.files[0]).parent) if source.files else None
        # A cascade's later stages ask another model the same thing: their rows are proved under that model.
        stages = [cfg] + [_for_model(cfg, m) for m in _stage_models(cfg)]
        builders = [(Renderer(c, input_dir=folder, columns=scan.columns), plan_for(c), c) for c in stages]
        for batch in source.batches():
            for renderer, plan, stage_cfg in builders:
                wanted = [i for i, row_id in enumerate(batch.ids) if row_id in expected and row_id not in out]
                if wanted:
                    out.update(_proved(_subset(batch, wanted), renderer, plan, stage_cfg, expected))
            if len(out) == len(expected):
                break
    except (InputError, ConfigError, OSError):
        return out  # the input moved or changed shape since: what was proved stands, the rest falls back
    return out


def _stage_models(cfg: Any) -> list[str]:
    """The models of a cascade's stages other than the job's own (none without a cascade)."""
    stages = getattr(cfg, "cascade", None) or []
    models = [getattr(s, "model", None) for s in stages]
    return list(dict.fromkeys(m for m in models if isinstance(m, str) and m != cfg.endpoint.model))


def _for_model(cfg: Any, model: str) -> Any:
    return cfg.model_copy(update={"endpoint": cfg.endpoint.model_copy(update={"model": model})})


def _subset(batch: InputBatch, rows: list[int]) -> InputBatch:
    return replace(batch, rows=[batch.rows[i] for i in rows], ids=[batch.ids[i] for i in rows],
                   origins=[batch.origins[i] for i in rows], errors=[batch.errors[i] for i in rows],
                   carried=batch.carried.take(rows))


def _proved(batch: InputBatch, renderer: Any, plan: Any, cfg: Any, expected: dict[str, str]) -> dict[str, str]:
    """Build the rows under each structured mode the run may have used; keep those whose key matches."""
    from ..prepare.request import RequestBuilder

    modes = [plan.mode, *[m for m in plan.modes if m != plan.mode]] if plan is not None else [None]
    out: dict[str, str] = {}
    for mode in modes:
        if plan is not None:
            plan.mode = mode
        built = RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens).build_batch(batch, renderer)
        for row_id, key in zip(batch.ids, built.keys):
            if key is not None and key == expected.get(row_id) and row_id not in out:
                out[row_id] = _user_text(orjson.loads(built.requests[key].payload))
        if len(out) == len(batch.ids):
            break
    return out


def _user_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
                elif isinstance(part, dict):
                    parts.append(f"[{part.get('type', 'part')}]")
    text = "\n".join(parts).strip()
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}… ({len(text):,} characters)"


def _carried(run: RunData, ids: set[str]) -> dict[str, str]:
    res = run.results
    name = next((c for c in TEXT_COLUMNS if c in res.columns), None)
    if name is None or res.height == 0:
        return {}
    hit = res.select(pl.col(run.id_column).cast(pl.String).alias("id"), pl.col(name).cast(pl.String).alias("t")) \
        .filter(pl.col("id").is_in(list(ids)) & pl.col("t").is_not_null())
    return dict(hit.iter_rows())
