"""Issue 19 item 5: any config value can be marked secret (`!secret VALUE`) or read from the environment
(`!env NAME`), in the file or with --set; webhook URLs and storage credentials are secret by default.
A secret value is used where it is meant to go and lands in no file, log, message or status output."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.conftest import job
from tests.hostile import HostileServer, completion
from tests.ops.test_ops import Receiver
from tests.support import cli, cli_in_process

HOOK_TOKEN = "T0001/B0002/hook-token-canary-4242"
STORAGE_SECRET = "storage-secret-canary-7777"
EXTRA_SECRET = "customer-4711-private-canary"


def assert_nowhere(out: Path, texts: list[str], *needles: str) -> None:
    blobs = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "store.sqlite"}
    blobs.update({f"text {i}": t.encode() for i, t in enumerate(texts)})
    for where, blob in blobs.items():
        for needle in needles:
            i = blob.find(needle.encode())
            assert i < 0, f"{needle} leaked into {where}: {blob[max(0, i - 300):i + 50]!r}"


def test_a_webhook_and_storage_credentials_given_with_set_stay_secret(tmp_path: Path) -> None:
    cfg = job(tmp_path, 6, sim={"fault_plan": [{"requests": "2", "fault": "422"}]}, limits={"max_concurrency": 1})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with Receiver() as hook:
        url = f"{hook.url}?token={HOOK_TOKEN}"
        done = cli_in_process("run", str(config), "--set", f"notify.webhook={url}",
                              "--set", f"output.storage_options.secret_key={STORAGE_SECRET}", "-v")
        assert done.returncode == 1, done.stderr  # a failed row: the webhook fires, the next step is printed
        assert len(hook.bodies) == 1  # the secret URL was used where it is meant to go
    out = tmp_path / "out"
    status, status_json = cli("status", str(out)), cli("status", str(out), "--json")  # a fresh process
    assert status.returncode == 0 and status_json.returncode == 0
    # The command that retries names the secret's key, masked (`--set 'KEY=!env NAME'` keeps it runnable).
    assert "notify.webhook=[REDACTED]" in json.loads((out / "summary.json").read_text())["next_step"]
    # The receiver on loopback runs in this process: its own access log (the path it was asked) is not ours.
    ours = "\n".join(line for line in done.stderr.splitlines() if "aiohttp.access" not in line)
    assert_nowhere(out, [done.stdout, ours, status.stdout, status.stderr, status_json.stdout,
                         hook.bodies[0].decode()], HOOK_TOKEN, STORAGE_SECRET)


def test_values_from_the_environment_and_marked_secret(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def answer(n: int, body: dict[str, Any]) -> tuple[int, Any]:
        seen.append(body)
        return 200, completion(json.dumps({"sentiment": "mixed", "score": 3}))

    with HostileServer(answer) as server, Receiver() as hook:
        cfg = job(tmp_path, 2)
        cfg["endpoint"] = {"base_url": server.url, "model": "openai/gpt-4-turbo", "api_key_env": "SECRET_TEST_KEY"}
        text = yaml.safe_dump(cfg) + "notify:\n  'on': [success]\n  webhook: !env HOOK_URL\n"
        text = text.replace("params:\n", f"params:\n  extra: {{user: !secret {EXTRA_SECRET}}}\n", 1)
        config = tmp_path / "job.yaml"
        config.write_text(text)
        env = {"HOOK_URL": f"{hook.url}?token={HOOK_TOKEN}", "SECRET_TEST_KEY": "sk-secret-test-key"}
        dry = cli_in_process("run", str(config), "--dry-run", env=env)  # its example request is masked too
        assert dry.returncode == 0 and "[REDACTED]" in dry.stdout and EXTRA_SECRET not in dry.stdout + dry.stderr
        done = cli_in_process("run", str(config), "-v", env=env)
        assert done.returncode == 0, done.stderr
        assert len(hook.bodies) == 1 and all(b["user"] == EXTRA_SECRET for b in seen)
    ours = "\n".join(line for line in done.stderr.splitlines() if "aiohttp.access" not in line)
    assert_nowhere(tmp_path / "out", [done.stdout, ours, hook.bodies[0].decode()], HOOK_TOKEN, EXTRA_SECRET)
    manifest = orjson.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert manifest["request"]["params"]["extra"]["user"] == "[REDACTED]"
    missing = cli_in_process("run", str(config), env={"SECRET_TEST_KEY": "sk-secret-test-key"})
    assert missing.returncode == 2 and "notify.webhook" in missing.stderr and "HOOK_URL" in missing.stderr


def test_secret_values_stay_out_of_config_errors(tmp_path: Path) -> None:
    cfg = job(tmp_path, 2)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    bad = cli_in_process("run", str(config), "--set", f"notify.webhook=ftp://hooks.example/{HOOK_TOKEN}")
    assert bad.returncode == 2 and "notify.webhook: must be an http(s) URL" in bad.stderr and "canary" not in bad.stderr
    marked = cli_in_process("run", str(config), "--set", f"limits.max_retries=!secret {HOOK_TOKEN}")
    assert marked.returncode == 2 and "limits.max_retries:" in marked.stderr and "(got '[REDACTED]')" in marked.stderr
    assert "canary" not in marked.stderr
    named = cli_in_process("run", str(config), "--set", "notify.webhook=!env https://x.example/hook")
    assert named.returncode == 2 and "!env takes the NAME of an environment variable" in named.stderr
    shaped = cli_in_process("run", str(config), "--set", "notify.webhook=!env [A, B]")
    assert shaped.returncode == 2 and "!env takes one plain value" in shaped.stderr
