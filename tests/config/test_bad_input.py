"""The bad-input catalogue (docs/failures.md): every bad input gets its documented message and exit code.

Each case builds a job in a temporary folder and runs it the way a user would, through the CLI's entry
function (`pipeline.cli.main`, in this process with a fresh process's environment, see
tests/support.py); three smoke cases run the real `python -m pipeline` in a child process. Row-level
problems (exit 1) are checked in failures.parquet, everything else in the message on stderr. No case
reaches beyond 127.0.0.1: host names other than loopback fail to resolve, as an unknown host would.
The last tests prove that a failed run loses or corrupts nothing an earlier run wrote.
"""
from __future__ import annotations

import base64
import errno
import json
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

import pipeline
from tests.conftest import SCHEMA, job, write_rows
from tests.support import assert_each_id_once, cli, cli_in_process, offline_dns

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
                       "kgAAAABJRU5ErkJggg==")


@dataclass
class Case:
    """A bad input: how to make it, what the run must exit with, and the message it must print."""

    build: Callable[[Path], list[str]]  # writes the files, returns the `pipeline` arguments
    code: int
    fragment: str
    where: str = "stderr"  # or "failures": a failure row's message (row-level problems, exit 1)
    subprocess: bool = False  # True: a smoke test of the real entry point, `python -m pipeline`


def write_job(tmp: Path, cfg: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_job(**sections: Any) -> Callable[[Path], list[str]]:
    """A job over 3 good rows (conftest.job) with some sections replaced."""
    def build(tmp: Path) -> list[str]:
        return ["run", str(write_job(tmp, job(tmp, 3, **sections))), "-q"]
    return build


def with_input(lines: list[bytes] | bytes, name: str = "in.jsonl", **sections: Any) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        data = tmp / name
        data.write_bytes(lines if isinstance(lines, bytes) else b"".join(lines))
        cfg = job(tmp, 0, **sections)
        cfg["input"]["path"] = str(data)
        return ["run", str(write_job(tmp, cfg)), "-q"]
    return build


def row(rid: str, text: Any = "fine product", **extra: Any) -> bytes:
    return (json.dumps({"rid": rid, "text": text, "stars": 3, **extra}) + "\n").encode()


GOOD = [row("a"), row("b")]


def image_rows(*values: Any) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "pics").mkdir()
        (tmp / "pics" / "ok.png").write_bytes(PNG)
        (tmp / "pics" / "notes.png").write_bytes(b"these are notes, not pixels\n")
        (tmp / "pics" / "a-folder.png").mkdir()
        with open(tmp / "pics" / "huge.png", "wb") as fh:
            fh.truncate(21 * 1024 * 1024)  # sparse: 21 MB without writing them
        lines = [row("ok", photo="pics/ok.png")] + [row(f"bad{i}", photo=v) for i, v in enumerate(values)]
        return with_input(lines, prompt={"images": ["photo"]})(tmp)
    return build


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once the socket closes


def network(base_url: Callable[[], str]) -> Callable[[Path], list[str]]:
    return run_job(endpoint={"base_url": base_url(), "api_key_env": "BAD_INPUT_KEY"},
                   limits={"max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_concurrency": 2})


def parquet_garbage(tmp: Path) -> list[str]:
    (tmp / "in.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    cfg = job(tmp, 0)
    cfg["input"]["path"] = str(tmp / "in.parquet")
    return ["run", str(write_job(tmp, cfg)), "-q"]


def not_writable_output(tmp: Path) -> list[str]:
    (tmp / "a-file").write_text("x")
    return run_job(output={"dir": str(tmp / "a-file" / "out")})(tmp)


def changed_job(tmp: Path) -> list[str]:
    assert pipeline.run(job(tmp, 3)).exit_code == 0
    return run_job(prompt={"user": "Another prompt: {{ text }}"})(tmp)


def locked_output(tmp: Path) -> list[str]:
    from pipeline.state.jobdir import JobDir

    holder = JobDir(tmp / "out")
    holder.lock()  # held for the test's life: another "run" owns the folder
    _HELD.append(holder)
    return run_job()(tmp)


_HELD: list[Any] = []


@pytest.fixture(autouse=True)
def _release_locks() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().unlock()


CASES: dict[str, Case] = {
    # -- the command line and the config file (exit 2, nothing sent) --
    "config file missing": Case(lambda t: ["run", str(t / "nope.yaml")], 2, "config file not found", subprocess=True),
    "YAML syntax error": Case(lambda t: ["run", str(write_job(t, "input: {path: [x\n"))], 2, "not valid YAML"),
    "config not a mapping": Case(lambda t: ["run", str(write_job(t, "- input\n- prompt\n"))], 2,
                                 "the config must be a mapping of sections"),
    "unknown config key": Case(run_job(limits={"max_concurency": 3}), 2,
                               "limits.max_concurency: unknown key; did you mean 'max_concurrency'?"),
    "required section missing": Case(lambda t: ["run", str(write_job(t, {k: v for k, v in job(t, 3).items()
                                                                         if k != "output"}))],
                                     2, "output: required key is missing"),
    "parameter out of range": Case(run_job(params={"temperature": 3}), 2,
                                   "params.temperature: Input should be less than or equal to 2"),
    "wrong parameter type": Case(run_job(params={"max_tokens": "lots"}), 2,
                                 "params.max_tokens: Input should be a valid integer"),
    "negative budget": Case(run_job(budget={"max_cost_usd": -5}), 2,
                            "budget.max_cost_usd: Input should be greater than 0"),
    "--set without =": Case(lambda t: run_job()(t) + ["--set", "limits.max_concurrency"], 2,
                            "--set takes KEY=VALUE"),
    "--set into a value": Case(lambda t: run_job()(t) + ["--set", "prompt.user.x=1"], 2,
                               "cannot set prompt.user.x: user is not a section"),
    "endpoint not a URL": Case(run_job(endpoint={"base_url": "ftp://example.com"}), 2,
                               "endpoint.base_url: must be an http(s) URL"),
    "key in a config header": Case(run_job(endpoint={"headers": {"Authorization": "Bearer sk-x"}}), 2,
                                   "do not put Authorization here"),
    "no prompt template": Case(run_job(prompt={"user": None}), 2, "set prompt.user (a template)"),
    "template syntax error": Case(run_job(prompt={"user": "Review: {{ text "}), 2,
                                  "prompt.user: template syntax error on line 1"),
    "template uses an unknown column": Case(run_job(prompt={"user": "{{ txet }}"}), 2,
                                            "prompt.user: uses 'txet', not among the input columns"),
    "schema file missing": Case(run_job(structured={"schema": "nope.json"}), 2, "nope.json not found"),
    "schema file not JSON": Case(lambda t: (t / "s.json").write_text("{oops") and
                                 run_job(structured={"schema": str(t / "s.json")})(t), 2, "is not valid JSON"),
    "invalid JSON Schema": Case(run_job(structured={"schema": {"type": "objekt"}}), 2,
                                "structured.schema: invalid JSON Schema at"),
    "missing API key": Case(run_job(endpoint={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "NO_SUCH_KEY"}), 2,
                            "the API key is missing: set the environment variable NO_SUCH_KEY"),
    # -- the input files (exit 2, nothing sent) --
    "input file missing": Case(run_job(input={"path": "nowhere.jsonl"}), 2, "input file or folder not found"),
    "input file empty": Case(with_input(b""), 2, "the input is empty"),
    "only blank lines": Case(with_input(b"\n\n  \n"), 2, "the input has no rows"),
    "wrong extension": Case(with_input(GOOD, name="in.csv"), 2, "unsupported file type; supported: .parquet"),
    "corrupt Parquet": Case(parquet_garbage, 2, "not a readable Parquet file"),
    "glob matching nothing": Case(run_job(input={"path": "data/*.jsonl"}), 2, "files match this pattern"),
    "unknown id column": Case(run_job(input={"id_column": "review_id"}), 2, "id column 'review_id' not found"),
    "duplicate ids": Case(with_input([row("a"), row("b"), row("a")]), 2, "1 duplicate ids in id column 'rid': 'a'"),
    "missing id": Case(with_input([row("a"), row("")]), 2, "empty or missing id in column 'rid'"),
    "id of the wrong type": Case(with_input([row("a"), b'{"rid": 1.5, "text": "x", "stars": 1}\n']), 2,
                                 "id in column 'rid' must be a string or an integer"),
    "carried column missing": Case(run_job(input={"columns": ["stars", "colour"]}), 2,
                                   "input.columns ['colour'] not found"),
    # -- rows that cannot become requests (exit 1, a failure row each, the run goes on) --
    "invalid UTF-8 in JSONL": Case(with_input(GOOD + [b'{"rid": "u", "text": "caf\xe9"}\n']), 1,
                                   "line is not valid UTF-8", "failures"),
    "a line that is not JSON": Case(with_input(GOOD + [b"{not json\n"]), 1, "line is not valid JSON", "failures",
                                    subprocess=True),
    "a line that is not an object": Case(with_input(GOOD + [b"[1, 2]\n"]), 1,
                                         "line holds a JSON list, not an object", "failures"),
    "null template value": Case(with_input(GOOD + [row("n", None)]), 1, "prompt.user: null in column 'text'",
                                "failures"),
    "non-string template value": Case(with_input(GOOD + [row("l", ["a", "list"])]), 1,
                                      "is a list, not text; format it in the template", "failures"),
    "prompt over the context window": Case(with_input(GOOD + [row("big", "word " * 130_000)]), 1,
                                           "over the 128,000-token context window", "failures"),
    "bad per-row parameter": Case(with_input(GOOD + [row("p", mt="many")],
                                             params={"from_columns": {"max_tokens": "mt"}}),
                                  1, "column 'mt' gives max_tokens='many'; it must be an integer", "failures"),
    "image file missing": Case(image_rows("pics/gone.png"), 1, "image file not found", "failures"),
    "image unreadable": Case(image_rows("pics/a-folder.png"), 1, "is not a regular file", "failures"),
    "image over 20 MB": Case(image_rows("pics/huge.png"), 1, "over the 20 MB per-image limit", "failures"),
    "image of an unsupported type": Case(image_rows("pics/notes.png"), 1, "not a supported image", "failures"),
    "image data URL malformed": Case(image_rows("data:text/plain,hello"), 1,
                                     "a data URL must look like data:image/<format>;base64,<data>", "failures"),
    "image of the wrong kind of value": Case(image_rows(12), 1, "an image must be a URL, a data URL, a file path",
                                             "failures"),
    # -- the output folder (exit 2) --
    "output dir not writable": Case(not_writable_output, 2, "is not writable (Not a directory)"),
    "output dir holds another job": Case(changed_job, 2, "holds answers to a different job"),
    "output dir in use": Case(locked_output, 2, "is in use by another run"),
    # -- the network (exit 3: run-fatal, resumable; nothing answered) --
    "unreachable host": Case(network(lambda: f"http://127.0.0.1:{closed_port()}/v1"), 3,
                             "Connect call failed", subprocess=True),
    "DNS failure": Case(network(lambda: "https://nonexistent.invalid/api/v1"), 3,
                        "cannot connect to https://nonexistent.invalid/api/v1"),
}


ENV = {"BAD_INPUT_KEY": "sk-test-bad-input"}


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    argv = case.build(tmp)
    if case.subprocess:
        p = cli(*argv, env=ENV, cwd=tmp)
    else:
        with offline_dns():
            p = cli_in_process(*argv, env=ENV, cwd=tmp)
    return p.returncode, p.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    code, stderr = run_case(case, tmp_path)
    assert code == case.code, stderr
    if case.where == "stderr":
        assert case.fragment in stderr, stderr
        if case.code == 2:
            assert not (tmp_path / "out" / "store.sqlite").exists() or name.startswith("output dir")  # nothing sent
    else:
        fail = pl.read_parquet(tmp_path / "out" / "failures.parquet")
        assert fail.height == 1 and fail["error_class"].to_list() == ["input"]
        assert case.fragment in fail["message"][0], fail["message"][0]
        assert pl.read_parquet(tmp_path / "out" / "results.parquet").height >= 1  # the run went on


def test_the_catalogue_is_documented() -> None:
    """Every case above is in docs/failures.md with its exit code and message."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "failures.md").read_text()
    missing = [name for name, case in CASES.items() if case.fragment.split(";")[0][:40] not in doc]
    assert not missing, f"document these in docs/failures.md: {missing}"
    assert len(CASES) + len(EXTRA) >= 30


# -- cases that need a server, a socket watch or a full disk --------------------------------------

EXTRA = ["TLS failure", "DNS sends nothing", "disk full in the store", "disk full writing the outputs"]


def test_tls_failure_is_run_fatal(tmp_path: Path) -> None:
    from pipeline_simulator import SimulatorThread

    with SimulatorThread() as url:  # plain HTTP on loopback, asked for https
        case = Case(network(lambda: url.replace("http://", "https://")), 3, "TLS failure talking to https://127.0.0.1")
        code, stderr = run_case(case, tmp_path)
    assert code == 3 and case.fragment in stderr and "WRONG_VERSION_NUMBER" in stderr


def test_dns_failure_sends_nothing_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[Any] = []
    real_connect = socket.socket.connect

    def watch(self: socket.socket, address: Any) -> Any:
        connects.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", watch)
    asked: list[str] = []
    with offline_dns(asked):
        p = cli_in_process(*network(lambda: "https://nonexistent.invalid/api/v1")(tmp_path), env=ENV, cwd=tmp_path)
    assert p.returncode == 3 and "Name or service not known" in p.stderr and "check endpoint.base_url" in p.stderr
    assert set(asked) == {"nonexistent.invalid"}  # the endpoint only: no telemetry, no other host
    assert not [a for a in connects if not (isinstance(a, str) or a[0] in ("127.0.0.1", "::1"))]


def snapshot(out: Path) -> dict[str, Any]:
    files = {n: (out / n).read_bytes() for n in ("results.parquet", "failures.parquet") if (out / n).exists()}
    with sqlite3.connect(out / "store.sqlite") as db:
        rows = sorted(db.execute("SELECT key, state, content FROM responses").fetchall())
    return {"files": files, "store": rows}


def stopped_run(tmp: Path, rows: int) -> tuple[dict[str, Any], pipeline.Summary]:
    """A job stopped part-way (a 401 from request 21 on): real outputs on disk that a resume extends."""
    cfg = job(tmp, rows, sim={"fault_plan": [{"requests": "21-", "fault": "401"}]}, limits={"max_concurrency": 4})
    cfg["input"]["batch_size"] = 10
    first = pipeline.run(cfg)
    assert first.exit_code == 3 and 0 < first.succeeded < rows
    cfg["endpoint"]["simulator"]["fault_plan"] = []
    return cfg, first


def test_disk_full_in_the_store_stops_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.state.store import Store

    cfg, first = stopped_run(tmp_path, 60)
    before = snapshot(tmp_path / "out")
    real_write, writes = Store._write, [0]

    def filling(self: Store, records: list[Any]) -> None:
        writes[0] += 1
        if writes[0] > 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_write(self, records)

    monkeypatch.setattr(Store, "_write", filling)
    code, stderr = run_case(Case(lambda t: ["run", str(write_job(t, cfg)), "-q"], 3, ""), tmp_path)
    assert code == 3, stderr
    assert "no space left on device (writing" in stderr and "store.sqlite" in stderr and "free space" in stderr
    after = snapshot(tmp_path / "out")
    assert set(before["store"]) <= set(after["store"])  # every answer stored before is still there, unchanged
    monkeypatch.setattr(Store, "_write", real_write)
    done = pipeline.run(cfg)
    assert (done.exit_code, done.succeeded) == (0, 60)
    assert assert_each_id_once(tmp_path / "out", 60).height == 60


def test_disk_full_writing_the_outputs_keeps_the_previous_ones_intact(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, first = stopped_run(tmp_path, 60)
    before = snapshot(tmp_path / "out")
    real = pq.ParquetWriter.write_table

    def full(self: pq.ParquetWriter, table: Any, *a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    code, stderr = run_case(Case(lambda t: ["run", str(write_job(t, cfg)), "-q"], 3, ""), tmp_path)
    assert code == 3 and "no space left on device" in stderr and "free space" in stderr, stderr
    after = snapshot(tmp_path / "out")
    assert after["files"] == before["files"]  # results/failures of the first run: byte for byte
    assert set(before["store"]) <= set(after["store"])
    assert pl.read_parquet(tmp_path / "out" / "results.parquet").height == first.succeeded  # readable, not torn
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    done = pipeline.run(cfg)
    # Answers paid for during the failed run were committed before the disk filled: not asked again.
    assert (done.exit_code, done.succeeded, done.requests_sent) == (0, 60, 60 - len(after["store"]))


def test_a_failed_second_run_leaves_the_first_runs_outputs_alone(tmp_path: Path) -> None:
    assert pipeline.run(job(tmp_path, 8)).exit_code == 0
    out = tmp_path / "out"
    before = snapshot(out)
    summary = (out / "summary.json").read_bytes()
    for build in (run_job(limits={"max_concurency": 1}), run_job(prompt={"user": "{{ text "}),
                  run_job(prompt={"user": "changed: {{ text }}"}), run_job(input={"id_column": "nope"})):
        code, stderr = run_case(Case(build, 2, ""), tmp_path)
        assert code == 2, stderr
        assert snapshot(out) == before and (out / "summary.json").read_bytes() == summary


def test_rows_after_a_bad_row_are_still_answered(tmp_path: Path) -> None:
    write_rows(tmp_path / "in.jsonl", 5)
    with open(tmp_path / "in.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe not utf-8\n")
    with open(tmp_path / "in.jsonl", "a") as fh:
        fh.write(json.dumps({"rid": "last", "text": "the last one", "stars": 2}) + "\n")
    s = pipeline.run(job(tmp_path, structured={"schema": SCHEMA}))
    assert (s.exit_code, s.succeeded, s.failed) == (1, 6, 1)
