"""The labelling stage for Ray Data users: `pipeline.ray.label(ds, config) -> ray.data.Dataset`.

    import ray, pipeline.ray
    ds = ray.data.read_parquet("s3://bucket/reviews/")
    labelled = pipeline.ray.label(ds, "job.yaml")     # or a dict without an `input` section
    labelled.write_parquet("s3://bucket/labelled/")

Adds `output` (typed from structured.schema), `content`, `error_class`, `error_message`, `request_key`,
`prompt_tokens`, `completion_tokens` and `cost_usd` to every row, with the job's limits shared by all
workers and every answer committed to the journal in output.dir first (docs/ray.md). Importing this
module does not import Ray; calling `label` does.
"""
from __future__ import annotations

from typing import Any


def label(ds: Any, config: Any, *, schema: Any = None) -> Any:
    from .engines.ray.label import label as _label
    return _label(ds, config, schema=schema)


__all__ = ["label"]
