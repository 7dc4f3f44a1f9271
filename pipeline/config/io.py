"""Where a job reads, writes and how it runs: the input, output, cache and run sections."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section

DEFAULT_BATCH_SIZE = 1000
IMAGE_BATCH_SIZE = 64


class InputConfig(Section):
    path: str = Field(description="A Parquet or JSONL file, a glob, or a folder of them.")
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="Forced format; auto uses the extension.")
    id_column: str | None = Field(None, description="Unique row id column; default: a hash of the row content.")
    columns: list[str] = Field(default_factory=list, description="Input columns carried into results.parquet.")
    batch_size: int | None = Field(
        None, ge=1, le=100_000,
        description="Rows per streaming batch; default 1000, or 64 when prompt.images is set (image payloads are "
                    "large, and a few open batches are held in memory).",
    )
    @property
    def rows_per_batch(self) -> int:
        """batch_size as a run uses it: a loaded Config always sets it; an InputConfig alone gets the default."""
        return self.batch_size if self.batch_size is not None else DEFAULT_BATCH_SIZE

    limit: int | None = Field(
        None, ge=1, description="Only the first N rows (`--limit N`): a cheap trial; outputs and resume are those "
                                "of a job over these rows. Not part of the job's identity.",
    )
    # -- object storage (pipeline/read/storage.py) --
    storage_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="For s3:// and gs:// paths: pyarrow S3FileSystem/GcsFileSystem arguments (region, "
                    "endpoint_override, access_key, ...) over the standard environment and config chain.",
    )



class OutputConfig(Section):
    dir: str = Field(description="The job's folder (answers, outputs, log); relative to the config's folder.")

    @field_validator("dir")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():  # resolved, '' is the config's own folder: the job would be written among the configs
            raise ValueError("is empty; name the job's folder (e.g. out/nightly), or '.' for the config's folder")
        return v
    fsync_interval_s: float = Field(1.0, gt=0, le=60)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    metrics_file: str | None = Field(
        None, description="Write the job's figures here in the Prometheus text format (node_exporter's textfile "
                          "collector), atomically, every 30 s during a run and at its end.",
    )
    # -- object storage (pipeline/read/storage.py) --
    publish: str | None = Field(
        None, description="An s3:// or gs:// folder: the local engine copies results.parquet, failures.parquet "
                          "and summary.json there at the end, each file complete or not at all.")
    storage_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Filesystem arguments for output.publish and an object-store output.dir.")



class CacheConfig(Section):
    dir: str | None = Field(None, description="Cross-run response cache shared by several jobs.")



class RunConfig(Section):
    grace_period_s: float = Field(30.0, ge=0, description="How long in-flight requests may finish on Ctrl-C.")
    progress: bool = True
    mode: Literal["sync", "batch"] = Field(
        "sync", description="sync: chat completions as the rows stream by; batch: the provider's Batch API "
                            "(OpenAI protocol, half price, answers within 24 h). The same request keys in both.")
    progress_interval_s: float = Field(
        30.0, gt=0, le=3600, description="When stderr is not a terminal (cron, a log file): one plain status line "
                                         "this often instead of a redrawn bar.",
    )

    # -- the Ray engine (pipeline/engines/ray/) --
    engine: Literal["local", "ray"] = Field("local", description="local: one process; ray: Ray Data actors.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); default: start a local instance.")
    workers: int = Field(4, ge=1, le=4096, description="Ray engine: actors sending requests (limits are shared).")
