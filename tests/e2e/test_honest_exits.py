"""A crash is never an outcome, errors say what they are, and our outputs are never read as input.

Findings 5, 9 and 10 of issue 13, through the CLI entry function in-process (plus one subprocess smoke
test of exit 70): problems found at start exit 2 naming the file and key; a bug exits 70 with the
traceback in a file and nothing lost; the environment's failures (full disk, too many open files, a
damaged store or Parquet file) say which and what to do.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.engines import api, runner
from pipeline.errors import InternalError
from pipeline.state.store import Store
from tests.conftest import REPO, job, write_rows


def run(tmp_path: Path, cfg: dict[str, Any] | str, *extra: str) -> int:
    path = tmp_path / "job.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return main(["run", str(path), "-q", *extra])


def err_of(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- 5: problems found at start are config/input errors -----------------------------------------

def test_a_carried_column_whose_type_differs_across_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"rid": ["a"], "text": ["x"], "stars": [[1, 2]]}), data / "a.parquet")
    pq.write_table(pa.table({"rid": ["b"], "text": ["y"], "stars": [{"n": 1}]}), data / "b.parquet")
    cfg = job(tmp_path, 0, input={"path": str(data)})
    assert run(tmp_path, cfg) == 2
    err = err_of(capsys)
    assert "b.parquet" in err and "carried column 'stars'" in err and "input.columns" in err


def deep_schema(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {"type": "object", "properties": {}}
    node = root
    for _ in range(levels):
        child: dict[str, Any] = {"type": "object", "properties": {}}
        node["properties"]["x"] = child
        node = child
    return root


def test_a_400_deep_or_self_containing_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "deep.json").write_text(json.dumps(deep_schema(400)))
    assert run(tmp_path, job(tmp_path, 2, structured={"schema": "deep.json"})) == 2
    assert "structured.schema" in err_of(capsys)
    base = yaml.safe_dump({k: v for k, v in job(tmp_path, 2).items() if k != "structured"})
    looped = base + "structured:\n  schema: &s {type: object, properties: {x: *s}}\n"
    assert run(tmp_path, looped) == 2
    assert "contains itself" in err_of(capsys)
    # A recursive $ref is a legal schema, not a crash.
    ref = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    assert run(tmp_path, job(tmp_path, 2, structured={"schema": ref})) == 0
    assert pq.read_metadata(tmp_path / "out" / "results.parquet").num_rows == 2
    capsys.readouterr()


@pytest.mark.parametrize("endpoint", [{"headers": {"X-Title": "a\r\nInjected: 1"}},
                                      {"headers": {"X-Ti tle": "a"}}])
def test_cr_lf_or_space_in_a_header(endpoint: dict[str, Any], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, job(tmp_path, 2, endpoint=endpoint)) == 2
    assert "endpoint.headers" in err_of(capsys)


def test_an_unknown_filter_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, job(tmp_path, 2, prompt={"user": "{{ text | shout }}"})) == 2
    assert "prompt.user" in err_of(capsys)


def test_dev_zero_as_an_image_is_a_quick_input_failure(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"rid": "a", "text": "t", "photo": "/dev/zero"}\n'
                                       '{"rid": "b", "text": "t", "photo": "zero"}\n')
    (tmp_path / "zero").symlink_to("/dev/zero")
    cfg = job(tmp_path, 0, prompt={"images": ["photo"]}, input={"columns": []})
    assert run(tmp_path, cfg) == 1
    import polars as pl
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet")
    assert fail.height == 2 and set(fail["error_class"]) == {"input"}


# -- 5: a bug exits 70, keeps everything, and says where the traceback is ------------------------

# InternalError: an invariant of ours broke; OSError with no errno the diagnosis knows: still a bug.
@pytest.mark.parametrize("bug", [RuntimeError, InternalError, OSError])
def test_an_unexpected_exception_exits_70_and_loses_nothing(bug: type[Exception], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise bug("a bug in merging")

    monkeypatch.setattr(runner, "merge_parts", boom)
    cfg = job(tmp_path, 6)
    assert run(tmp_path, cfg) == 70
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error" in lines[0] and f"{bug.__name__}: a bug in merging" in lines[0]
    reports = list((tmp_path / "out").glob("internal-error-*.txt"))
    assert len(reports) == 1 and str(reports[0]) in lines[0]
    assert "a bug in merging" in reports[0].read_text() and "Traceback" in reports[0].read_text()
    history = [orjson.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_bytes().splitlines()]
    assert history[-1]["exit_code"] == 70  # the history says what the process said
    db = sqlite3.connect(tmp_path / "out" / "store.sqlite")  # closed cleanly, every answer kept
    assert db.execute("SELECT count(*) FROM responses WHERE state = 'ok'").fetchone()[0] == 6
    db.close()
    monkeypatch.undo()
    summary = api.run(cfg)
    assert summary.exit_code == 0 and summary.requests_sent == 0 and summary.succeeded == 6


def test_exit_70_from_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(tmp_path, 3)))
    code = ("import sys, pipeline.engines.runner as r\n"
            "def boom(*a, **k): raise ZeroDivisionError('smoke')\n"
            "r.merge_parts = boom\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['run', {str(path)!r}, '-q']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 70, proc.stderr
    assert "internal error" in proc.stderr and "Traceback" not in proc.stderr


# -- 10: errors that say what they are -------------------------------------------------------------

def test_a_damaged_store_names_the_file_and_how_to_set_it_aside(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out" / "parts").mkdir(parents=True)
    (tmp_path / "out" / "store.sqlite").write_bytes(b"this is not a database, it was overwritten" * 200)
    assert run(tmp_path, job(tmp_path, 3)) == 2
    err = err_of(capsys)
    store = str(tmp_path / "out" / "store.sqlite")
    assert f"the answer store {store} is damaged" in err and f"mv {store} {store}.damaged" in err
    assert "free disk space" not in err


def test_a_damaged_parquet_page_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.parquet"
    texts = [f"review {i} " + "words " * 40 for i in range(300)]
    pq.write_table(pa.table({"rid": [f"r{i}" for i in range(300)], "text": texts, "stars": [1] * 300}), data,
                   compression="snappy", use_dictionary=False)
    raw = bytearray(data.read_bytes())
    meta = pq.ParquetFile(data).metadata.row_group(0).column(1)
    start = meta.data_page_offset + 40
    raw[start:start + 400] = b"\xff" * 400  # garble the text column's page, keep the footer
    data.write_bytes(bytes(raw))
    cfg = job(tmp_path, 0, input={"path": str(data)})
    assert run(tmp_path, cfg) == 2
    err = err_of(capsys)
    assert str(data) in err and "damaged" in err


def test_a_schema_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "schemas").mkdir()
    assert run(tmp_path, job(tmp_path, 2, structured={"schema": "schemas"})) == 2
    err = err_of(capsys)
    assert "structured.schema" in err and "is a folder" in err


def test_too_many_open_files_says_what_to_lower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def emfile(*a: Any, **k: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files", str(tmp_path / "out" / "parts"))

    monkeypatch.setattr(runner, "merge_parts", emfile)
    assert run(tmp_path, job(tmp_path, 3)) == 3
    err = err_of(capsys)
    assert "too many open files" in err and "limits.max_concurrency (now 16)" in err and "ulimit -n" in err


def test_a_full_disk_says_so_not_cannot_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real_init = Store.__init__

    def tiny(self: Store, path: str, **kw: Any) -> None:
        real_init(self, path, **kw)
        if not kw.get("readonly"):
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count={pages + 1}")  # SQLite's own "database or disk is full"

    monkeypatch.setattr(Store, "__init__", tiny)
    cfg = job(tmp_path, 40)
    code = run(tmp_path, cfg)
    err = err_of(capsys)
    assert code == 3 and "no space left on device" in err and "cannot rollback" not in err


def test_yaml_duplicate_keys_alias_bombs_and_infinities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = yaml.safe_dump(job(tmp_path, 2))
    assert run(tmp_path, base + "limits:\n  max_concurrency: 2\n") == 2
    err = err_of(capsys)
    assert "duplicate key 'limits'" in err and "line" in err
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    assert run(tmp_path, base + bomb) == 2
    assert "alias" in err_of(capsys)
    for key, value in (("backoff_base_s", ".inf"), ("requests_per_minute", ".nan"), ("backoff_max_s", ".inf")):
        cfg = job(tmp_path, 2)
        cfg["limits"].pop(key, None)
        text = yaml.safe_dump(cfg).replace("limits:\n", f"limits:\n  {key}: {value}\n")
        assert run(tmp_path, text) == 2
        assert f"limits.{key}" in err_of(capsys)


# -- 9: our own outputs are never read as input ------------------------------------------------------

@pytest.mark.parametrize("pattern, out", [("{data}", "{data}"), ("{data}/**/*.parquet", "{data}/out"),
                                          ("{data}/**", "{data}/out"), ("{data}/**/*.parquet", "{data}")])
def test_outputs_inside_the_input_folder_are_not_read_back(pattern: str, out: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", 8).read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), data / "reviews.parquet")
    cfg = job(tmp_path, 0, input={"path": pattern.format(data=data)}, output={"dir": out.format(data=data)})
    for _ in range(2):
        summary = api.run(cfg)
        assert summary.exit_code == 0 and summary.rows_total == 8
    assert summary.requests_sent == 0  # the second run resumed: same input, nothing new


def test_a_damaged_part_file_is_named_and_costs_nothing_to_rebuild(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Parts are named after their batch's content and reused unread: the damage is found by the footer
    # check before reuse, named, and the batch rebuilt from the store (no request) over the damaged file.
    cfg = job(tmp_path, 6)
    assert api.run(cfg).exit_code == 0
    (part,) = (tmp_path / "out" / "parts").glob("*.r.parquet")
    good = pq.read_table(part)
    part.write_bytes(b"PAR1 garbage, not a footer")  # a shared folder: anyone may have written it
    assert run(tmp_path, cfg) == 0
    err_of(capsys)  # -q: the warning is in pipeline.log, where an operator looks after a night's run
    warned = [e for e in map(json.loads, (tmp_path / "out" / "pipeline.log").read_text().splitlines())
              if e["level"] == "WARNING"]
    assert any(f"the part file {part} is damaged" in e["msg"] and "nothing is asked again" in e["msg"]
               for e in warned)
    rebuilt = pq.read_table(part)  # rebuilt in place: the same rows and answers
    assert rebuilt.select(["rid", "completion_tokens"]).equals(good.select(["rid", "completion_tokens"]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["succeeded"], summary["requests_sent"]) == (6, 0)
    again = api.run(cfg)
    assert (again.exit_code, again.succeeded, again.requests_sent) == (0, 6, 0)
