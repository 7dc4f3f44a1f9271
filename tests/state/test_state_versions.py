"""State versions: the store's named migrations run once each and are recorded; a store or manifest written
by a newer version is refused with a clear message (exit 2), never misread."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import StateVersionError
from pipeline.state import store as store_mod
from pipeline.state.jobdir import JobDir
from pipeline.state.store import MIGRATIONS, Store
from pipeline.vocab import Record
from tests.conftest import job


def rec(i: int) -> Record:
    return Record(key=f"k{i}", state="ok", prompt_tokens=10, completion_tokens=5, cost_usd=0.5)


def migrations_of(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT name FROM _migrations ORDER BY rowid")]


def test_a_new_store_records_each_named_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(str(path)).close()
    Store(str(path)).close()
    assert migrations_of(path) == [m.__name__ for m in MIGRATIONS] == ["m001_responses", "m002_tally_and_parts",
                                                                       "m003_cache_confidence_usage"]


def test_an_appended_migration_runs_once_on_an_existing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    Store(str(path)).close()
    calls: list[int] = []

    def m003_notes(db: sqlite3.Connection) -> None:
        calls.append(1)
        db.execute("CREATE TABLE notes (text TEXT)")

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, m003_notes])
    for _ in range(2):
        Store(str(path)).close()
    assert calls == [1] and migrations_of(path)[-1] == "m003_notes"


@pytest.mark.parametrize("legacy", ["v1 (responses only)", "v2 (tally, no _migrations)"])
def test_a_store_from_before_migrations_is_upgraded_without_counting_twice(tmp_path: Path, legacy: str) -> None:
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as db:  # the tables as older versions created them, with two answers
        for m in MIGRATIONS[: 1 if legacy.startswith("v1") else 2]:
            m(db)
        for i in range(2):
            db.execute("INSERT INTO responses (key, state, prompt_tokens, completion_tokens, cost_usd, cache_hit) "
                       "VALUES (?, 'ok', 10, 5, 0.5, 0)", (f"old{i}",))
    store = Store(str(path))
    store.put_now([rec(9)])
    totals = store.totals()
    store.close()
    assert totals["by_state"] == {"ok": 3} and totals["cost_usd"] == pytest.approx(1.5)
    assert migrations_of(path) == [m.__name__ for m in MIGRATIONS]


def test_a_store_from_a_newer_version_is_refused_also_read_only(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO _migrations VALUES ('m042_from_the_future', 0)")
    for readonly in (False, True):
        with pytest.raises(StateVersionError, match="newer version.*m042_from_the_future"):
            Store(str(path), readonly=readonly)


def test_a_manifest_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path / "out")
    jobdir.path.mkdir()
    jobdir.manifest_path.write_bytes(orjson.dumps({"version": 99, "request": {}}))
    with pytest.raises(StateVersionError, match="version 99.*newer"):
        jobdir.read_manifest()


def test_running_over_a_newer_store_exits_2_and_leaves_it_alone(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = job(tmp_path, 3)
    out = tmp_path / "out"
    out.mkdir()
    Store(str(out / "store.sqlite")).close()
    with sqlite3.connect(out / "store.sqlite") as db:
        db.execute("INSERT INTO _migrations VALUES ('m042_from_the_future', 0)")
    before = (out / "store.sqlite").read_bytes()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "-q"]) == 2
    assert "newer version of the pipeline" in capsys.readouterr().err
    assert (out / "store.sqlite").read_bytes() == before
