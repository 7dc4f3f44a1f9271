"""Reading a job folder that is damaged, writing where one cannot, and a reader that goes away (issue 19
items 9 and 10): a clear error naming the file (exit 2) or a quiet end, never exit 70 or an
internal-error file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import job
from tests.support import child_env, cli_in_process, write_config


@pytest.fixture
def done_job(tmp_path: Path) -> Path:
    path = write_config(tmp_path, job(tmp_path, 4))
    assert cli_in_process("run", str(path), "-q").returncode == 0
    return tmp_path / "out"


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:400] = bytes(b ^ 0x5A for b in data[100:400])
    path.write_bytes(bytes(data))


def test_report_and_show_on_a_damaged_results_file_name_it_and_a_rerun_repairs_it(
        done_job: Path, tmp_path: Path) -> None:
    results = done_job / "results.parquet"
    _damage(results)
    report = cli_in_process("report", str(done_job), "-o", str(tmp_path / "r.html"))
    assert report.returncode == 2 and str(results) in report.stderr and "damaged" in report.stderr
    show = cli_in_process("show", str(done_job), "r000001")
    assert show.returncode == 2 and str(results) in show.stderr
    rerun = cli_in_process("run", str(tmp_path / "job.yaml"), "-q")  # rewrites the outputs from the store
    assert rerun.returncode == 0, rerun.stderr
    assert cli_in_process("report", str(done_job), "-o", str(tmp_path / "r.html")).returncode == 0
    assert not list(tmp_path.rglob("internal-error-*"))


def test_report_under_a_path_that_is_a_file_is_a_usage_error(done_job: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "job.yaml"
    for target in (blocker / "r.html", tmp_path / "no-such-folder" / "r.html", done_job):
        done = cli_in_process("report", str(done_job), "-o", str(target))
        assert done.returncode == 2, done.stderr
        assert str(target) in done.stderr and "internal error" not in done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(done_job: Path) -> None:
    """`pipeline show OUT ID | head -1`: the pipe's reader is gone before the row is printed."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away: every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "show", str(done_job), "r000001"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=child_env(), timeout=120,
                              check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
    assert not list(done_job.glob("internal-error-*"))
