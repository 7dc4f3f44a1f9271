"""A Parquet input with a damaged data page (footer intact) and files that are not input in the input
folder (issue 19 item 9): a clear error naming the file (exit 2), and what is skipped is said once."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import job, write_rows
from tests.support import cli_in_process, write_config


def _damaged_parquet(path: Path, column: int) -> Path:
    """200 rows, snappy; 60 bytes inside one column's first page flipped: the footer still reads."""
    n = 200
    pq.write_table(pa.table({"rid": [f"r{i}" for i in range(n)], "text": [f"review {i} " * 20 for i in range(n)],
                             "stars": [i % 5 for i in range(n)]}), path, compression="snappy")
    meta = pq.ParquetFile(path).metadata.row_group(0).column(column)
    data = bytearray(path.read_bytes())
    start = (meta.dictionary_page_offset or meta.data_page_offset) + 30
    data[start:start + 60] = bytes(b ^ 0x5A for b in data[start:start + 60])
    path.write_bytes(bytes(data))
    pq.ParquetFile(path)  # the footer is intact
    return path


@pytest.mark.parametrize("column", [0, 1], ids=["id column", "text column"])
def test_a_damaged_data_page_is_named_not_a_crash(tmp_path: Path, column: int) -> None:
    data = _damaged_parquet(tmp_path / "in.parquet", column)
    cfg = job(tmp_path, 1, input={"path": str(data)})
    for extra in ((), ("--dry-run",)):
        done = cli_in_process("run", str(write_config(tmp_path, cfg)), "-q", *extra)
        assert done.returncode == 2, done.stderr
        assert str(data) in done.stderr and "damaged" in done.stderr
        assert "internal error" not in done.stderr
    assert not list(tmp_path.rglob("internal-error-*"))


def test_files_that_are_not_input_in_the_folder_are_skipped_and_said_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_rows(folder / "a.jsonl", 3)
    (folder / "notes.csv").write_text("rid,text\nx,y\n")
    (folder / ".hidden.jsonl").write_text('{"rid": "h", "text": "hidden"}\n')
    cfg = job(tmp_path, 1, input={"path": str(folder)})
    done = cli_in_process("run", str(write_config(tmp_path, cfg)), "-q")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert len(said) == 1 and "notes.csv" in said[0] and ".hidden.jsonl" in said[0] and "2 file(s)" in said[0]
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert sorted(res["rid"].to_list()) == ["r000000", "r000001", "r000002"]
