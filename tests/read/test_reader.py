from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.read import reader
from pipeline.read.reader import Source
from pipeline.vocab import InputBatch


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows))
    return path


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def source(path: Path | str, **kw: Any) -> Source:
    return Source(InputConfig(path=str(path), **kw))


def collect(src: Source, skip: Any = None) -> list[InputBatch]:
    return list(src.batches(skip=skip))


def all_ids(batches: list[InputBatch]) -> list[str]:
    return [i for b in batches for i in b.ids]


def sha_id(row: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def test_jsonl_rows_ids_origins_and_carried(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "text": "x", "stars": 1}\n\n  \n{"id": "b", "text": "y", "stars": 5}\n')
    src = source(p, id_column="id", columns=["stars"])
    scan = src.scan()
    assert (scan.rows, scan.columns, scan.files) == (2, ["id", "text", "stars"], [str(p)])
    [batch] = collect(src)
    assert batch.index == 0
    assert batch.ids == ["a", "b"]
    assert batch.origins == [(str(p), 1), (str(p), 4)]
    assert batch.rows == [{"id": "a", "text": "x", "stars": 1}, {"id": "b", "text": "y", "stars": 5}]
    assert batch.errors == [None, None]
    assert batch.carried.schema == pa.schema([("__id", pa.string()), ("stars", pa.int64())])
    assert batch.carried.to_pylist() == [{"__id": "a", "stars": 1}, {"__id": "b", "stars": 5}]


def test_parquet_types_row_groups_and_origins(tmp_path: Path) -> None:
    p = tmp_path / "in.parquet"
    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    table = pa.table({
        "id": pa.array(range(10), pa.int32()),
        "score": pa.array([i / 2 for i in range(10)], pa.float32()),
        "when": pa.array([when] * 10, pa.timestamp("ms")),
        "tags": pa.array([["a"]] * 10, pa.list_(pa.string())),
    })
    pq.write_table(table, p, row_group_size=3)
    src = source(p, id_column="id", columns=["score", "when", "tags"], batch_size=4)
    assert src.scan().rows == 10
    batches = collect(src)
    assert [b.index for b in batches] == [0, 1, 2]
    assert all_ids(batches) == [str(i) for i in range(10)]
    assert batches[1].origins == [(str(p), i) for i in range(4, 8)]
    assert batches[0].carried.schema == pa.schema(
        [("__id", pa.string()), ("score", pa.float32()), ("when", pa.timestamp("ms")), ("tags", pa.list_(pa.string()))])
    assert batches[2].rows[0] == {"id": 8, "score": 4.0, "when": when, "tags": ["a"]}


def test_folder_and_glob_batches_span_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"k": 3}, {"k": 4}, {"k": 5}])
    write_jsonl(tmp_path / "a.ndjson", [{"k": 1}, {"k": 2}])
    pq.write_table(pa.table({"k": [6, 7]}), tmp_path / "c.parquet")
    (tmp_path / "README.md").write_text("not input")
    src = source(tmp_path, id_column="k", columns=["k"], batch_size=3)
    assert [Path(f).name for f in src.files] == ["a.ndjson", "b.jsonl", "c.parquet"]
    batches = collect(src)
    assert [b.ids for b in batches] == [["1", "2", "3"], ["4", "5", "6"], ["7"]]
    assert [Path(o[0]).name for o in batches[1].origins] == ["b.jsonl", "b.jsonl", "c.parquet"]
    assert batches[1].carried.column("k").to_pylist() == [4, 5, 6]
    globbed = source(tmp_path / "*.jsonl", id_column="k")
    assert [Path(f).name for f in globbed.files] == ["b.jsonl"]


def test_skip_does_not_parse_and_keeps_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"n": i % 7} for i in range(50)]  # repeats, so derived ids need suffixes
    write_jsonl(tmp_path / "a.jsonl", rows[:23])
    write_jsonl(tmp_path / "b.jsonl", rows[23:])
    full = collect(source(tmp_path, batch_size=5))
    src = source(tmp_path, batch_size=5)
    src.scan()
    parsed: list[int] = []
    real_parse = reader.parse

    def counting(raw: bytes, line: int) -> Any:
        parsed.append(line)
        return real_parse(raw, line)

    monkeypatch.setattr(reader, "parse", counting)
    kept = collect(src, skip=lambda i: i % 3 != 1)
    assert [b.index for b in kept] == [1, 4, 7]
    assert len(parsed) == 15  # only the rows of the three batches that were read
    by_index = {b.index: b for b in full}
    for b in kept:
        assert (b.ids, b.origins, b.rows) == (by_index[b.index].ids, by_index[b.index].origins, by_index[b.index].rows)
    assert len(set(all_ids(full))) == 50


def test_skip_parquet_across_row_groups(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(100)]}), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(30)]}), tmp_path / "b.parquet", row_group_size=7)
    full = collect(source(tmp_path, id_column="id", batch_size=12))
    kept = collect(source(tmp_path, id_column="id", batch_size=12), skip=lambda i: i not in (0, 5, 8, 10))
    by_index = {b.index: b for b in full}
    assert [b.index for b in kept] == [0, 5, 8, 10]
    for b in kept:
        assert (b.ids, b.origins) == (by_index[b.index].ids, by_index[b.index].origins)
    assert kept[-1].ids == [f"s{i}" for i in range(20, 30)]


def test_bad_lines_become_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n\n{"a": "\xff\xfe"}\n[1, 2]\n{"a": 2}\n')
    [batch] = collect(source(p, columns=["a"]))
    assert len(batch.rows) == 5
    assert [e is None for e in batch.errors] == [True, False, False, False, True]
    bad_json, bad_utf8, not_object = batch.errors[1:4]
    assert bad_json is not None and (bad_json.file, bad_json.row) == (str(p), 2) and "not valid JSON" in str(bad_json)
    assert bad_utf8 is not None and bad_utf8.row == 4 and "UTF-8" in str(bad_utf8)
    assert not_object is not None and not_object.row == 5 and "not an object" in str(not_object)
    assert batch.ids[1:4] == ["in.jsonl:2", "in.jsonl:4", "in.jsonl:5"]
    assert batch.rows[1] == {}
    assert batch.carried.column("a").to_pylist() == [1, None, None, None, 2]


def test_derived_ids_stable_and_unique(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"b": 1, "a": "x"}, {"a": "y"}, {"a": "x", "b": 1}, {"a": "x", "b": 1}]
    p = write_jsonl(tmp_path / "in.jsonl", rows)
    ids = all_ids(collect(source(p, batch_size=2)))
    base = sha_id(rows[0])
    assert ids == [base, sha_id(rows[1]), f"{base}-2", f"{base}-3"]
    assert all_ids(collect(source(p, batch_size=3))) == ids
    # The duplicate's suffix does not depend on whether the first copy's batch is read.
    assert all_ids(collect(source(p, batch_size=2), skip=lambda i: i == 0)) == ids[2:]


def test_derived_ids_parquet_match_jsonl(tmp_path: Path) -> None:
    rows = [{"a": "x", "b": 1}, {"a": "x", "b": 1}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    ids = all_ids(collect(source(tmp_path / "in.parquet")))
    assert ids == [sha_id(rows[0]), sha_id(rows[0]) + "-2"]


def test_duplicate_ids_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x"}, {"id": "y"}, {"id": "x"}, {"id": 7}])
    pq.write_table(pa.table({"id": ["7", "z"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError) as info:
        source(tmp_path, id_column="id").scan()
    msg = str(info.value)
    assert "2 duplicate ids" in msg and "'x'" in msg and "'7'" in msg
    assert "a.jsonl line 1" in msg and "a.jsonl line 3" in msg and "b.parquet row 0" in msg


def test_missing_id_column_lists_columns(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "stars": 1}])
    with pytest.raises(InputError, match=r"'review_id' not found; available columns: text, stars"):
        source(p, id_column="review_id").scan()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"'review_id' not found; available columns: text"):
        source(tmp_path / "in.parquet", id_column="review_id").scan()
    with pytest.raises(InputError, match=r"input.columns \['nope'\] not found"):
        source(p, columns=["nope"]).scan()


def test_null_or_empty_id_names_row(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "in.jsonl", [{"id": "a"}, {"id": ""}, {"id": None}])
    with pytest.raises(InputError) as info:
        source(p, id_column="id").scan()
    assert (info.value.file, info.value.row) == (str(p), 2)
    pq.write_table(pa.table({"id": ["a", "b", None]}), tmp_path / "in.parquet")
    with pytest.raises(InputError) as info:
        source(tmp_path / "in.parquet", id_column="id").scan()
    assert info.value.row == 2


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.jsonl", "not found"),
    (lambda d: put(d / "empty.jsonl", b""), "empty"),
    (lambda d: put(d / "data.csv", b"a,b\n"), r"\.parquet, \.jsonl, \.ndjson"),
    (lambda d: put(d / "bad.parquet", b"PAR1 garbage"), "not a readable Parquet"),
    (lambda d: d / "*.jsonl", "no .* files match"),
    (lambda d: d, "holds no input files"),
])
def test_unusable_inputs(tmp_path: Path, make: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        source(make(tmp_path))


def test_blank_only_file_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"\n\n \n")
    with pytest.raises(InputError, match="no rows"):
        source(tmp_path / "in.jsonl").scan()


def test_jsonl_carried_types_are_unified(tmp_path: Path) -> None:
    rows = [{"n": 1, "mixed": "a", "obj": {"k": 1}}] * 3 + [{"n": 2.5, "mixed": 3, "obj": None}]
    p = write_jsonl(tmp_path / "in.jsonl", rows)
    [batch] = collect(source(p, columns=["n", "mixed", "obj"]))
    schema = batch.carried.schema
    assert schema.field("n").type == pa.float64()
    assert schema.field("mixed").type == pa.string()
    assert schema.field("obj").type == pa.struct([("k", pa.int64())])
    assert batch.carried.column("mixed").to_pylist() == ["a", "a", "a", "3"]


def test_forced_format_and_fingerprint(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "data.txt", [{"a": 1}])
    src = source(p, format="jsonl")
    scan = src.scan()
    assert scan.rows == 1 and len(scan.digests) == 1
    assert source(p, format="jsonl").scan().digests == scan.digests
    write_jsonl(p, [{"a": 1}, {"a": 2}])
    assert source(p, format="jsonl").scan().digests != scan.digests


def test_bad_row_ids_unique_across_same_named_files(tmp_path: Path) -> None:
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "in.jsonl").write_bytes(b"oops\n")
    ids = all_ids(collect(source(tmp_path / "*" / "in.jsonl")))
    assert ids == ["x/in.jsonl:1", "y/in.jsonl:1"]
