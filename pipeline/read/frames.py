"""Input given in memory: `pipeline.run(cfg, input=df)` with a polars or pandas DataFrame or an Arrow table.

The table is written once to a Parquet file named after its content (in a private temp folder, removed
when the run ends), and the run reads that file like any other input. Named after the content, the
same data gives the same file, path and batch digests on the next call, so an unchanged DataFrame
re-runs for free and a grown one sends only its new rows, as a growing file does.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError


def as_arrow(data: Any) -> pa.Table:
    """An Arrow table from a polars/pandas DataFrame, an Arrow table or record batch."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    library = type(data).__module__.split(".")[0]
    if library == "polars":
        return data.to_arrow()
    if library == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    raise UsageError(f"input= takes a polars or pandas DataFrame or a pyarrow Table, not {type(data).__name__}")


@contextmanager
def frame_file(data: Any) -> Iterator[str]:
    """The path of a Parquet file holding `data`, for the duration of the block."""
    table = as_arrow(data)
    if table.num_rows == 0:
        raise UsageError("input= holds no rows")
    folder = Path(tempfile.gettempdir()) / f"pipeline-input-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    # The temp folder is shared: a folder someone else made (or a link) there could read or swap our rows.
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UsageError(f"{folder} is not a private folder of this user; remove it and run again")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        h = hashlib.blake2b(digest_size=12)
        with open(tmp, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        path = folder / f"{h.hexdigest()}.parquet"
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)
