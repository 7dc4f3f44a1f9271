"""Object storage for the local engine: s3:// input (files, folders, globs) and output.publish, against
a real S3-compatible server on 127.0.0.1 (moto), with dummy credentials and no other network."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.config import InputConfig
from pipeline.errors import ConfigError, InputError
from pipeline.read import storage
from pipeline.read.reader import Source
from tests.conftest import job, write_rows


def _upload(tmp_path: Path, bucket: str, key: str, rows: int, start: int = 0) -> str:
    local = write_rows(tmp_path / f"up-{start}.jsonl", rows, start=start)
    uri = f"{bucket}/{key}"
    storage.write_bytes(uri, local.read_bytes())
    return uri


def test_endpoint_comes_from_aws_endpoint_url(s3_bucket: str) -> None:
    fs, path = storage.filesystem(f"{s3_bucket}/x")
    storage.write_bytes(f"{s3_bucket}/x", b"hello")
    assert path.endswith("/x") and storage.read_bytes(f"{s3_bucket}/x") == b"hello"
    assert storage.stat(f"{s3_bucket}/x")[0] == 5


def test_glob_folder_and_file_resolution(tmp_path: Path, s3_bucket: str) -> None:
    _upload(tmp_path, s3_bucket, "data/a.jsonl", 3)
    _upload(tmp_path, s3_bucket, "data/b.jsonl", 2, start=3)
    _upload(tmp_path, s3_bucket, "data/deeper/c.jsonl", 4, start=5)
    storage.write_bytes(f"{s3_bucket}/data/notes.txt", b"not input")
    folder = Source(InputConfig(path=f"{s3_bucket}/data", id_column="rid"))
    assert [p.rsplit("/", 1)[1] for p in folder.files] == ["a.jsonl", "b.jsonl"]
    assert folder.scan().rows == 5
    flat = Source(InputConfig(path=f"{s3_bucket}/data/*.jsonl", id_column="rid"))
    assert len(flat.files) == 2
    deep = Source(InputConfig(path=f"{s3_bucket}/data/**.jsonl", id_column="rid"))
    assert len(deep.files) == 3 and deep.scan().rows == 9
    with pytest.raises(InputError, match="not found"):
        Source(InputConfig(path=f"{s3_bucket}/nothing-here"))
    with pytest.raises(InputError, match="match"):
        Source(InputConfig(path=f"{s3_bucket}/data/*.parquet"))


def test_bad_storage_options_name_keys_never_values(s3_bucket: str) -> None:
    with pytest.raises(ConfigError) as err:
        Source(InputConfig(path=f"{s3_bucket}/data/*.jsonl",
                           storage_options={"secret_key": "hunter2-SECRET", "no_such_option": 1}))
    assert "no_such_option" in str(err.value) and "hunter2" not in str(err.value)


def test_local_engine_reads_s3_and_publishes(tmp_path: Path, s3_bucket: str) -> None:
    _upload(tmp_path, s3_bucket, "in/part-0.jsonl", 12)
    table = pa.Table.from_pylist([json.loads(line) for line in write_rows(tmp_path / "p.jsonl", 8, start=12)
                                  .read_text().splitlines()])
    fs, path = storage.filesystem(f"{s3_bucket}/in/part-1.parquet")
    pq.write_table(table, path, filesystem=fs)
    cfg = job(tmp_path, input={"path": f"{s3_bucket}/in/*", "format": "auto"},
              output={"publish": f"{s3_bucket}/published"})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 0 and summary.succeeded == 20
    published = storage.list_files(f"{s3_bucket}/published")
    assert [p.rsplit("/", 1)[1] for p in published] == ["failures.parquet", "results.parquet", "summary.json"]
    fs, path = storage.filesystem(f"{s3_bucket}/published/results.parquet")
    ids = pq.read_table(path, filesystem=fs)["rid"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(20)]
    remote = json.loads(storage.read_bytes(f"{s3_bucket}/published/summary.json"))
    assert remote["succeeded"] == 20
    # A re-run resumes from the local job folder and publishes the same files again.
    assert pipeline.run(cfg, quiet=True).resumed_rows == 20


def test_publish_failure_keeps_local_outputs_and_stops_resumably(tmp_path: Path, s3_server: str) -> None:
    cfg = job(tmp_path, rows=5, output={"publish": "s3://no-such-bucket-xyz/out"})
    summary = pipeline.run(cfg, quiet=True)
    assert summary.exit_code == 3 and summary.stopped == "publish"
    assert (tmp_path / "out" / "results.parquet").exists()
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["stopped"] == "publish" and "re-run" in saved["next_step"]


def test_local_engine_refuses_object_store_output_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.dir"):
        pipeline.run(job(tmp_path, rows=2, output={"dir": "s3://bucket/out"}), quiet=True)


def test_put_file_is_complete_or_absent(tmp_path: Path, s3_bucket: str) -> None:
    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * 100)
    storage.put_file(str(local), f"{s3_bucket}/pub/big.bin")
    assert storage.read_bytes(f"{s3_bucket}/pub/big.bin") == b"x" * 100
    assert storage.list_files(f"{s3_bucket}/pub") == [f"{s3_bucket}/pub/big.bin"]  # no temporary left
    with pytest.raises(OSError):
        storage.put_file(str(tmp_path / "missing"), f"{s3_bucket}/pub/other.bin")
    assert storage.list_files(f"{s3_bucket}/pub") == [f"{s3_bucket}/pub/big.bin"]
