"""Issue 19 item 6: text from a server (answers, error messages) reaches a terminal with its control
characters spelled out, never obeyed: `run -v`, `run -q` stopped by a 401, `status`, `show`.
Against a small hostile server on 127.0.0.1 whose messages carry escape sequences."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.common.terminal import printable
from tests.conftest import job
from tests.hostile import HostileServer, completion
from tests.support import cli_in_process, write_config

KEY_ENV = "ESCAPE_TEST_KEY"
# Clear the screen, set the window title, an OSC 8 hyperlink, a carriage return that rewrites the line.
NASTY = "\x1b[2J\x1b]0;pwned\x07\x1b]8;;https://evil.invalid\x1b\\click\x1b]8;;\x1b\\\rdone\x9b31m"
ANSWER = json.dumps({"sentiment": "positive", "score": 4, "tags": [NASTY]})


def hostile_job(tmp_path: Path, server: HostileServer, rows: int, **sections: Any) -> Path:
    cfg = job(tmp_path, rows, **sections)
    cfg["endpoint"] = {"base_url": server.url, "model": "openai/gpt-4-turbo", "api_key_env": KEY_ENV}
    return write_config(tmp_path, cfg)


def assert_inert(text: str, where: str) -> None:
    raw = [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]
    assert not raw, f"{where} wrote control characters {raw!r} to the terminal"


def test_printable_spells_out_controls_and_keeps_text() -> None:
    assert printable("naïve 東京\tok") == "naïve 東京\tok"
    assert printable("a\x1b[2Jb\r\nc\u202e") == "a\\x1b[2Jb\\r\\nc\\u202e"
    assert printable("a\nb", lines=True) == "a\nb"


def test_server_text_is_escaped_on_the_terminal(tmp_path: Path) -> None:
    def answer(n: int, body: dict[str, Any]) -> tuple[int, Any]:
        if n == 1:
            return 500, {"error": {"message": f"upstream {NASTY}", "code": 500}}
        return 200, completion(ANSWER, usage={"prompt_tokens": 30, "completion_tokens": 20})

    env = {KEY_ENV: "sk-escape-test-key"}
    with HostileServer(answer) as server:
        config = hostile_job(tmp_path, server, 2, limits={"max_concurrency": 1})
        verbose = cli_in_process("run", str(config), "-v", env=env)
        assert verbose.returncode == 0, verbose.stderr
        assert_inert(verbose.stderr, "run -v")
        assert "upstream \\x1b[2J\\x1b]0;pwned\\x07" in verbose.stderr  # shown, not obeyed
        shown = cli_in_process("show", str(tmp_path / "out"), "r000000", env=env)
        assert shown.returncode == 0 and "pwned" in shown.stdout
        assert_inert(shown.stdout + shown.stderr, "show")

    def refuse(n: int, body: dict[str, Any]) -> tuple[int, Any]:
        return 401, {"error": {"message": f"bad key {NASTY}", "code": 401}}

    with HostileServer(refuse) as server:
        config = hostile_job(tmp_path / "b", server, 3) if (tmp_path / "b").mkdir() is None else None
        assert config is not None
        quiet = cli_in_process("run", str(config), "-q", env=env)
        assert quiet.returncode == 3, quiet.stderr
        assert_inert(quiet.stderr, "run -q on a 401")
        assert "bad key \\x1b[2J" in quiet.stderr
    status = cli_in_process("status", str(tmp_path / "b" / "out"), env=env)
    assert status.returncode == 0 and "bad key" in status.stdout  # the last run's stop message
    assert_inert(status.stdout + status.stderr, "status")
