"""The store: durable before counted, survives kill -9 and torn writes, readable while written."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.state.store import Store
from pipeline.vocab import Record
from tests.support import kill


def rec(i: int, state: str = "ok") -> Record:
    return Record(key=f"k{i:06d}", state=state, content=f"answer {i}", prompt_tokens=10, completion_tokens=5,
                  cost_usd=0.001, raw=b'{"choices":[]}')


def test_put_get_and_totals(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite"))

    async def write() -> None:
        await asyncio.gather(*(store.put(rec(i)) for i in range(50)))
        await store.put(rec(50, "permanent"))

    asyncio.run(write())
    got = store.get_many([f"k{i:06d}" for i in range(0, 60, 5)])
    assert sorted(got) == [f"k{i:06d}" for i in range(0, 51, 5)]
    assert got["k000050"].state == "permanent"
    assert got["k000005"].raw is None  # bodies only when asked
    assert store.get_many(["k000005"], with_raw=True)["k000005"].raw == b'{"choices":[]}'
    totals = store.totals()
    assert totals["by_state"] == {"ok": 50, "permanent": 1}
    assert totals["prompt_tokens"] == 510 and totals["cost_usd"] == pytest.approx(0.051)
    store.close()


def test_later_record_replaces_earlier(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite"))
    store.put_now([rec(1, "permanent")])
    store.put_now([rec(1, "ok")])
    assert store.get_many(["k000001"])["k000001"].state == "ok"
    assert store.totals()["by_state"] == {"ok": 1}
    store.close()


def test_puts_in_one_tick_share_one_commit(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite"))
    commits = 0
    original = store._write

    def counting(records: list[Record]) -> None:
        nonlocal commits
        commits += 1
        original(records)

    store._write = counting  # type: ignore[method-assign]

    async def write() -> None:
        await asyncio.gather(*(store.put(rec(i)) for i in range(100)))

    asyncio.run(write())
    assert commits == 1
    assert store.totals()["by_state"]["ok"] == 100
    store.close()


def test_a_reader_sees_committed_records_while_the_writer_runs(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    writer = Store(path)
    writer.put_now([rec(i) for i in range(10)])
    reader = Store(path, readonly=True)
    assert reader.totals()["by_state"] == {"ok": 10}
    writer.put_now([rec(i) for i in range(10, 20)])
    assert reader.totals()["by_state"] == {"ok": 20}
    reader.close()
    writer.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pipeline.state.store import Record, Store
    store = Store(sys.argv[1], fsync_interval_s=0.2)
    async def main():
        i = 0
        while True:
            await asyncio.gather(*(store.put(Record(key=f"k{i+j:07d}", state="ok", content="x" * 500,
                                                    raw=b"y" * 2000)) for j in range(7)))
            i += 7
            print(i, flush=True)
    asyncio.run(main())
""")


def test_kill_9_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    acknowledged = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parents[2])
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        last = 0
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
            if last >= 700 * (round_ + 1):
                break
        kill(proc)
        acknowledged = last
        store = Store(path)
        count = store.totals()["by_state"].get("ok", 0)
        # Everything the writer was told is stored is there; records are whole (groups of 7 commit together).
        assert count >= acknowledged
        assert count % 7 == 0
        store.close()


def test_torn_wal_tail_is_dropped_and_earlier_records_survive(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    store = Store(path)
    store.put_now([rec(i) for i in range(100)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # first 100 now in the main file
    for i in range(100, 200):
        store.put_now([rec(i)])
    wal = Path(path + "-wal")
    data = wal.read_bytes()
    # Simulate a crash mid-write: cut the WAL in the middle of its last frame and scribble over the end.
    os.close(os.open(path, os.O_RDONLY))
    store._stop.set()
    store._db.close()
    cut = len(data) - 700
    wal.write_bytes(data[:cut] + b"\x00garbage" * 10)
    reopened = Store(path)
    count = reopened.totals()["by_state"]["ok"]
    assert 100 <= count < 200
    keys = sorted(reopened.get_many([f"k{i:06d}" for i in range(200)]))
    assert keys == [f"k{i:06d}" for i in range(count)]  # a prefix: nothing earlier is corrupted
    reopened.close()
