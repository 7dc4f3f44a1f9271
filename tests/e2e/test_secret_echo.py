"""Servers that echo secrets back, secret headers from the environment, and header validation.

Finding 3 of issue 13. A canary key (and a secret header value) that a hostile or careless server
echoes in error bodies, 200-with-error bodies, mid-stream error events and a fatal 401 message must
appear nowhere: every file in output.dir (store.sqlite and its WAL as bytes), stdout, stderr, logs.
"""
from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pipeline.cli import main
from pipeline.common import redact
from pipeline.config import load_config
from pipeline.errors import ConfigError, PermanentError
from tests.conftest import job
from tests.send.test_secrets import Recorder

KEY = "sk-or-v1-ECHO/canary+5678"  # a slash and a plus: JSON, \/ and URL escaping each differ from the plain text
HEADER_SECRET = "azure-secret-canary-9876"
ENV = "SEC_ECHO_API_KEY"
NEEDLES = [KEY, "ECHO/canary", "ECHO\\/canary", urllib.parse.quote(KEY, safe=""), "canary+5678",
           HEADER_SECRET, "canary-9876"]


def assert_clean(blob: bytes | str, where: str) -> None:
    data = blob if isinstance(blob, bytes) else blob.encode()
    for needle in NEEDLES:
        assert needle.encode() not in data, f"a secret leaked into {where}"
        # Python's json.dumps escapes non-ASCII: that spelling must not survive either.
        assert json.dumps(needle)[1:-1].encode() not in data, f"an escaped secret leaked into {where}"


def assert_dir_clean(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.name == "store.sqlite" for p in files)
    for p in files:
        assert_clean(p.read_bytes(), str(p))


def write(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


ECHO_PLAN = [  # the simulator puts each rule's message in its error body / stream error event
    {"requests": "1-2", "fault": "400", "message": f"invalid key {KEY} (json: {json.dumps(KEY)})"},
    {"requests": "3-4", "fault": "error_200", "message": f"upstream rejected {KEY}"},
    {"requests": "5-6", "fault": "stream_error", "message": f"bad auth {urllib.parse.quote(KEY, safe='')}"},
    {"requests": "7-30", "fault": "500", "message": f"oops {KEY}"},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_server_echoing_the_key_leaves_no_trace(stream: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV, KEY)
    params = {"stream": True, "max_tokens": 200} if stream else {}
    cfg = job(tmp_path, 8, sim={"api_key": KEY, "fault_plan": ECHO_PLAN}, params=params,
              limits={"max_retries": 1, "max_concurrency": 2})
    cfg["endpoint"]["api_key_env"] = ENV
    caplog.set_level(logging.DEBUG)
    code = main(["run", str(write(tmp_path, cfg)), "-v"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert_clean(captured.out + captured.err, "stdout/stderr")
    assert_clean(caplog.text, "logs")
    assert_dir_clean(tmp_path / "out")
    import polars as pl
    messages = pl.read_parquet(tmp_path / "out" / "failures.parquet")["message"].to_list()
    assert any(redact.MASK in m for m in messages)  # the echo is kept, the secret is not


def test_a_fatal_401_echoing_the_key_stops_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV, KEY)
    plan = [{"requests": "1-100", "fault": "401", "message": f"Incorrect API key provided: {KEY}"}]
    cfg = job(tmp_path, 4, sim={"api_key": KEY, "fault_plan": plan})
    cfg["endpoint"]["api_key_env"] = ENV
    assert main(["run", str(write(tmp_path, cfg))]) == 3
    err = capsys.readouterr().err
    assert "Incorrect API key provided: [REDACTED]" in err
    assert_clean(err, "stderr")
    assert_dir_clean(tmp_path / "out")


def test_secret_headers_come_from_the_environment_and_are_scrubbed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setenv("SEC_AZURE_KEY", HEADER_SECRET)
    seen: list[dict[str, str]] = []

    def echo(path: str) -> tuple[int, dict[str, str], bytes]:
        headers = recorder.requests[-1][1]
        seen.append(headers)
        return 400, {"Content-Type": "application/json"}, orjson.dumps(
            {"error": {"message": f"bad request; you sent {json.dumps(headers)}", "code": 400}})

    with Recorder(echo) as recorder:
        cfg = job(tmp_path, 3, endpoint={"base_url": f"http://127.0.0.1:{recorder.port}/v1", "api_key_env": ENV,
                                         "secret_headers": {"api-key": "SEC_AZURE_KEY"}},
                  limits={"max_concurrency": 1})
        path = write(tmp_path, cfg)
        assert main(["run", str(path)]) == 1
    assert seen and all(h.get("api-key") == HEADER_SECRET for h in seen)  # sent to the endpoint...
    out = capsys.readouterr()
    assert_clean(out.out + out.err, "stdout/stderr")
    assert_dir_clean(tmp_path / "out")  # ...and nowhere else: not the manifest, store, failures, summary
    plain = dict(cfg, endpoint={k: v for k, v in cfg["endpoint"].items() if k != "secret_headers"})
    assert load_config(path).request_fingerprint() == load_config(plain).request_fingerprint()


def test_a_missing_secret_header_variable_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SEC_MISSING_VAR", raising=False)
    cfg = job(tmp_path, 2, endpoint={"secret_headers": {"api-key": "SEC_MISSING_VAR"}})
    assert main(["run", str(write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "endpoint.secret_headers.api-key" in err and "SEC_MISSING_VAR" in err
    assert not (tmp_path / "out" / "store.sqlite").exists()


@pytest.mark.parametrize("section, says", [
    ({"headers": {"Authorization ": "Bearer x"}}, "do not put Authorization here"),
    ({"headers": {"AUTHORIZATION": "Bearer x"}}, "do not put Authorization here"),
    ({"headers": {"api-key": "sk-abc"}}, "endpoint.secret_headers"),
    ({"headers": {"X Title": "a"}}, "not a valid HTTP header name"),
    ({"headers": {"X-Title\r\nX-Evil": "a"}}, "not a valid HTTP header name"),
    ({"headers": {"X-Title": "a\r\nX-Evil: 1"}}, "line break"),
    ({"app_title": "a\nb"}, "line break"),
    ({"secret_headers": {"authorization": "SOME_VAR"}}, "endpoint.api_key_env"),
    ({"secret_headers": {"api-key": "sk-the-value-itself!"}}, "NAME of an environment variable"),
])
def test_headers_are_validated_as_http_does(section: dict[str, Any], says: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = job(tmp_path, 2, endpoint=section)
    with pytest.raises(ConfigError, match="endpoint"):
        load_config(cfg)
    assert main(["run", str(write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "Bearer x" not in err and "sk-abc" not in err


def test_the_scrubber_knows_every_spelling() -> None:
    redact.register(KEY + "é")  # non-ASCII: Python's json.dumps spells it \u00e9
    for spelling in (json.dumps(KEY + "é")[1:-1], orjson.dumps(KEY + "é").decode()[1:-1]):
        assert redact.scrub(f"x {spelling} y") == "x [REDACTED] y"
    redact.register(KEY)
    redact.register("short")  # too short to tell from text: left alone rather than corrupting answers
    for spelling in (KEY, json.dumps(KEY)[1:-1], orjson.dumps(KEY).decode()[1:-1], KEY.replace("/", "\\/"),
                     urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY)):
        assert redact.scrub(f"x {spelling} y") == "x [REDACTED] y"
        assert redact.scrub_bytes(f"x {spelling} y".encode()) == b"x [REDACTED] y"
    assert redact.scrub("a short answer") == "a short answer"
    exc = redact.scrub_error(PermanentError(f"echo {KEY}", content=KEY, status=400))
    assert KEY not in str(exc) and KEY not in exc.message and exc.content == "[REDACTED]"
    logging.getLogger("pipeline.test").warning("key %s", KEY)  # the record factory scrubs every record
    record = logging.getLogRecordFactory()("x", logging.INFO, "f", 1, "key %s", (KEY,), None)
    assert record.getMessage() == "key [REDACTED]"


def test_show_never_prints_a_secret_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SEC_AZURE_KEY", HEADER_SECRET)
    path = write(tmp_path, job(tmp_path, 2, endpoint={"secret_headers": {"api-key": "SEC_AZURE_KEY"}}))
    assert main(["run", str(path), "-q"]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "out"), "r000000", "--json"]) == 0  # the variable is still set: not read
    shown = capsys.readouterr()
    assert_clean(shown.out + shown.err, "show")
    assert json.loads(shown.out)["request"]["headers"]["api-key"] == "[redacted]"


def test_the_ray_journal_keeps_no_secret(tmp_path: Path) -> None:
    """A Ray worker's answers are scrubbed where they are kept too, as the local store's are."""
    import asyncio

    from pipeline.state.segments import Journal, decode
    from pipeline.vocab import Record

    redact.register(KEY)
    journal = Journal(str(tmp_path / "out"), interval_s=0.0)
    journal.route("k1", "0")
    record = Record(key="k1", state="permanent", attempts=1, status=400, message=f"invalid key {KEY}",
                    content=f"echo {KEY}", raw=f'{{"error": "{KEY}"}}'.encode())
    asyncio.run(journal.put(record))
    [segment] = (tmp_path / "out").rglob("*.parquet")
    [kept] = decode(segment.read_bytes())  # the segment is compressed: look at what it holds
    assert_clean(repr(kept), "the journal segment")
    assert (kept.message, kept.content) == (f"invalid key {redact.MASK}", f"echo {redact.MASK}")


def test_a_bug_whose_cause_quotes_the_key_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Exit 70 writes the traceback (causes included) to a report, pipeline.log and history.jsonl: the
    # cause chain is where a server's text hides, and none of those files may keep the key.
    from pipeline.engines import runner

    def boom(*a: Any, **k: Any) -> Any:
        try:
            raise RuntimeError(f"the server said: bad key {KEY}")
        except RuntimeError as cause:
            raise ZeroDivisionError("a bug in merging") from cause

    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setattr(runner, "merge_parts", boom)
    cfg = job(tmp_path, 4, sim={"api_key": KEY})
    cfg["endpoint"]["api_key_env"] = ENV
    assert main(["run", str(write(tmp_path, cfg)), "-q"]) == 70
    assert_clean(capsys.readouterr().err.encode(), "stderr")
    assert (tmp_path / "out" / "pipeline.log").exists() and (tmp_path / "out" / "history.jsonl").exists()
    assert_dir_clean(tmp_path / "out")
