"""Links planted in a shared output folder are never written through (finding 4 of issue 13).

A victim file outside the folder stands for /etc/passwd under a root cron job. A link is planted at
each name the runner creates; the victim must stay byte-for-byte the same, and the run must either
succeed (the link itself replaced by our file) or refuse clearly with exit 2.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
import yaml

from pipeline.cli import main
from pipeline.common import safefs
from tests.conftest import job

VICTIM = b"root:x:0:0:do not touch\n"

REPLACED = ["manifest.json", "summary.json", "results.parquet", "failures.parquet", ".write-test",
            "manifest.json.tmp", "summary.json.tmp", "results.parquet.tmp", "failures.parquet.tmp",
            "parts/{part}.r.parquet", "parts/{part}.f.parquet", "parts/{part}.r.parquet.tmp"]
REFUSED = [".lock", "store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "parts"]


def setup(tmp_path: Path) -> tuple[Path, Path]:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(tmp_path, 6)))
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    return victim, out


def test_links_at_output_names_are_replaced_not_followed(tmp_path: Path) -> None:
    victim, out = setup(tmp_path)
    # Parts are named after their batch's content: learn this input's part name from a run elsewhere.
    rehearsal = tmp_path / "rehearsal"
    assert main(["run", str(tmp_path / "job.yaml"), "-q", "--set", f"output.dir={rehearsal}"]) == 0
    (part,) = orjson.loads((rehearsal / "manifest.json").read_bytes())["batches"]
    names = [name.format(part=part) for name in REPLACED]
    for name in names:  # all at once: each must be replaced (or ignored), none followed
        (out / name).symlink_to(victim)
    assert main(["run", str(tmp_path / "job.yaml"), "-q"]) == 0
    assert victim.read_bytes() == VICTIM
    for name in ("manifest.json", "summary.json", "results.parquet", f"parts/{part}.r.parquet"):
        assert (out / name).is_file() and not (out / name).is_symlink()  # our file took the name


@pytest.mark.parametrize("name", REFUSED)
def test_links_where_files_are_opened_by_path_are_refused(name: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    victim, out = setup(tmp_path)
    if name == "parts":
        (out / "parts").rmdir()
        (out / "parts").symlink_to(tmp_path)  # a folder link: parts would be written beside the victim
    else:
        (out / name).symlink_to(victim)
    assert main(["run", str(tmp_path / "job.yaml"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "never writes through links" in err and name in err and "Traceback" not in err
    assert victim.read_bytes() == VICTIM
    assert not list(tmp_path.glob("*.parquet"))


def test_a_hard_link_at_the_lock_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim, out = setup(tmp_path)
    os.link(victim, out / ".lock")  # truncating the lock would truncate the victim
    assert main(["run", str(tmp_path / "job.yaml"), "-q"]) == 2
    assert "hard link" in capsys.readouterr().err and victim.read_bytes() == VICTIM


def test_an_output_dir_that_is_itself_a_link_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "out"
    real.mkdir(parents=True)
    cfg = job(tmp_path, 6)
    (tmp_path / "out").symlink_to(real)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml"), "-q"]) == 0
    assert (real / "results.parquet").is_file() and (real / "store.sqlite").is_file()


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "a.json"
    with pytest.raises(RuntimeError), safefs.atomic_writer(dest) as fh:
        fh.write(b"half")
        raise RuntimeError("disk trouble")
    assert list(tmp_path.iterdir()) == []
    names = {safefs.temp_name(dest).name for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(".a.json.") and n.endswith(".tmp") for n in names)


def test_ray_outputs_in_a_local_folder_never_follow_links(tmp_path: Path) -> None:
    """The Ray engine's local writes (journal segments, parts, manifest, summary) go through read/storage.py."""
    from pipeline.errors import UnsafePathError
    from pipeline.read import storage

    victim, out = setup(tmp_path)
    (out / "summary.json").symlink_to(victim)
    storage.write_bytes(str(out / "summary.json"), b"{}", root=str(out))  # the link is replaced
    assert victim.read_bytes() == VICTIM and not (out / "summary.json").is_symlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "journal").symlink_to(elsewhere)  # a folder link: segments would land beside the victim
    with pytest.raises(UnsafePathError):
        storage.write_bytes(str(out / "journal" / "00000000" / "w-000001.parquet"), b"x", root=str(out))
    local = tmp_path / "part.parquet"
    local.write_bytes(b"part")
    (out / "results.parquet").mkdir()
    (out / "results.parquet" / "part-00000000.parquet").symlink_to(victim)
    storage.put_file(str(local), str(out / "results.parquet" / "part-00000000.parquet"), root=str(out))
    assert victim.read_bytes() == VICTIM and not list(elsewhere.iterdir())
    assert (out / "results.parquet" / "part-00000000.parquet").read_bytes() == b"part"


def test_a_link_at_a_reused_part_is_never_read_into_the_outputs(tmp_path: Path) -> None:
    # An unchanged batch reuses its part files; a link planted at one of them must not bring the target's
    # rows into the outputs: the batch is rebuilt from the store (nothing asked again), the link replaced.
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline
    cfg = job(tmp_path, 6)
    assert pipeline.run(cfg).exit_code == 0
    victim = tmp_path / "someone-elses.parquet"
    pq.write_table(pa.table({"rid": ["NOT-IN-THE-INPUT"], "error_class": ["input"]}), victim)
    (part,) = (tmp_path / "out" / "parts").glob("*.f.parquet")
    part.unlink()
    part.symlink_to(victim)
    again = pipeline.run(cfg)
    assert (again.exit_code, again.requests_sent, again.succeeded, again.failed) == (0, 0, 6, 0)
    assert not part.is_symlink() and pq.read_table(victim).num_rows == 1
    assert pq.read_table(tmp_path / "out" / "failures.parquet").num_rows == 0
