"""`pipeline check CONFIG`: what a run would find out too late, found out before anything is paid for.

Each check is one line, ok or not, and says what to do: the config loads (exit 2 otherwise, as `run`),
the API key's environment variable is set, the endpoint answers with this key (OpenRouter's free
`GET /key`, else `GET /models`, else one chat request of one output token for the job's model), in
run.mode: batch the Batch API answers (`GET /batches`), and every place the run writes (output.dir,
output.publish, output.metrics_file) accepts a file: a probe is written and removed. Nothing of the job
is sent. Exit 0 when every check passed, 2 when something in the config or the environment must be
changed, 3 when the endpoint could not be reached (try again later).
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass
from typing import TextIO

import orjson

from ..common.terminal import printable
from ..config import Config, load_config
from ..errors import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, PipelineError, RequestError, RunFatalError
from ..read import storage
from ..send.files_api import FilesApi
from ..send.transport import HttpTransport

_PROBE = ".pipeline-check-"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    exit_code: int = EXIT_OK  # what failing this check means: 2 change something, 3 try again later


def run_checks(config: str, overrides: list[str] | None = None) -> list[Check]:
    cfg = load_config(config, overrides)  # a ConfigError leaves with exit 2, as `run` would
    checks = [Check("config", True, f"{cfg.source} is valid (job {cfg.request_fingerprint()})")]
    key = _key(cfg, checks)
    if key is not None:
        checks.extend(asyncio.run(_endpoint(cfg, key)))
    checks.append(_writable_folder("output.dir", cfg.output.dir))
    if cfg.output.metrics_file:
        checks.append(_writable_folder("output.metrics_file", os.path.dirname(cfg.output.metrics_file) or "."))
    if cfg.output.publish:
        checks.append(_publish(cfg))
    return checks


def _key(cfg: Config, checks: list[Check]) -> str | None:
    try:
        key = cfg.api_key()
    except PipelineError as exc:
        checks.append(Check("key", False, str(exc), EXIT_USAGE))
        return None
    what = "not needed (built-in simulator)" if cfg.endpoint.base_url == "simulator" else \
        f"{cfg.endpoint.api_key_env} is set"
    checks.append(Check("key", True, what))
    return key


async def _endpoint(cfg: Config, key: str) -> list[Check]:
    """The endpoint with this key, and its Batch API in batch mode: free calls first, one token at most."""
    if cfg.endpoint.base_url == "simulator":
        return [Check("endpoint", True, "the built-in simulator (started by the run; nothing to reach)")]
    transport = HttpTransport(cfg.endpoint.base_url, key, headers=cfg.endpoint.request_headers(cfg.source),
                              timeout_s=min(cfg.endpoint.timeout_s, 60.0), read_timeout_s=cfg.endpoint.read_timeout_s,
                              connect_timeout_s=cfg.endpoint.connect_timeout_s, pool_size=2)
    api = FilesApi(transport)
    try:
        out = [await _answers(cfg, transport, api)]
        if cfg.run.mode == "batch" and out[0].ok:
            out.append(await _batch_api(api))
        return out
    finally:
        await transport.close()


async def _answers(cfg: Config, transport: HttpTransport, api: FilesApi) -> Check:
    """Free calls first: OpenRouter's `GET /key` (credits left too), then `GET /models`; a server with
    neither gets one chat request of one output token for the job's model."""
    base = cfg.endpoint.base_url
    try:
        for path in ("/key", "/models"):
            reply = await api.call("GET", path)
            if 200 <= reply.status < 300 or reply.status in (401, 402, 403):
                return _judge(f"GET {base}{path}", reply.status, reply.body, _listing(cfg, path, reply.body))
        payload = orjson.dumps({"model": cfg.endpoint.model, "max_tokens": 1,
                                "messages": [{"role": "user", "content": "Reply with OK."}]})
        reply = await transport.send(payload)
        return _judge(f"POST {base}/chat/completions (1 output token)", reply.status, reply.body,
                      f"model {cfg.endpoint.model} answered")
    except (RequestError, RunFatalError) as exc:
        return Check("endpoint", False, f"{exc}; check endpoint.base_url and the network", EXIT_STOPPED)


async def _batch_api(api: FilesApi) -> Check:
    try:
        reply = await api.call("GET", "/batches", params={"limit": "1"})
    except (RequestError, RunFatalError) as exc:
        return Check("batch api", False, f"{exc}", EXIT_STOPPED)
    if reply.status in (404, 405):
        return Check("batch api", False, f"GET /batches answered {reply.status}: this endpoint has no Batch API; "
                                         "use run.mode: sync", EXIT_USAGE)
    check = _judge("GET /batches", reply.status, reply.body, "the Batch API answers")
    check.name = "batch api"
    return check


def _listing(cfg: Config, path: str, body: bytes) -> str:
    """What a 200 of /key or /models says: the credits left, or whether the model is offered."""
    try:
        data = orjson.loads(body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return "answers"
    if path == "/key" and isinstance(data, dict):
        left = data.get("limit_remaining")
        return "the key is accepted" + (f"; credits left: {left}" if isinstance(left, (int, float)) else "")
    if isinstance(data, list):
        ids = {m.get("id") for m in data if isinstance(m, dict)}
        seen = cfg.endpoint.model in ids
        return f"the key is accepted; {len(ids)} models listed" + (
            f", {cfg.endpoint.model} among them" if seen else f", {cfg.endpoint.model} NOT among them")
    return "the key is accepted"


def _judge(call: str, status: int, body: bytes, ok: str) -> Check:
    if 200 <= status < 300:
        return Check("endpoint", True, f"{call}: {status}, {ok}")
    said = _said(body)
    if status in (401, 403):
        return Check("endpoint", False, f"{call}: {status}, the key is refused{said}; check the key in the "
                                        "environment variable named by endpoint.api_key_env", EXIT_USAGE)
    if status == 402:
        return Check("endpoint", False, f"{call}: 402, no credits left{said}; add credits", EXIT_USAGE)
    if status == 429 or status >= 500:
        return Check("endpoint", False, f"{call}: {status}{said}; the endpoint is busy or failing now, try "
                                        "again later", EXIT_STOPPED)
    return Check("endpoint", False, f"{call}: {status}{said}; check endpoint.base_url and endpoint.model",
                 EXIT_USAGE)


def _said(body: bytes) -> str:
    """The server's own message, short (it is untrusted text: the caller prints it escaped)."""
    try:
        err = orjson.loads(body)
        msg = err.get("error", {}).get("message") if isinstance(err.get("error"), dict) else err.get("error")
    except (orjson.JSONDecodeError, AttributeError):
        msg = body[:200].decode("utf-8", "replace")
    return f" ({str(msg)[:200]})" if msg else ""


def _writable_folder(name: str, folder: str) -> Check:
    """A probe file created and removed in the folder, or in the nearest folder above it that exists (the
    run creates the rest): the run could write there. Nothing is left behind."""
    here = os.path.abspath(folder)
    while not os.path.lexists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        return Check(name, False, f"{here} is a file, not a folder; choose another {name}", EXIT_USAGE)
    probe = os.path.join(here, f"{_PROBE}{uuid.uuid4().hex}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Check(name, False, f"cannot write in {here}: {exc.strerror or exc}; choose another {name} "
                                  "or fix the folder's permissions", EXIT_USAGE)
    return Check(name, True, f"{folder} is writable")


def _publish(cfg: Config) -> Check:
    dest = cfg.output.publish
    assert dest is not None
    if not storage.is_remote(dest):
        return Check("output.publish", False, "must be an s3:// or gs:// folder", EXIT_USAGE)
    probe = storage.join(dest, f"{_PROBE}{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"pipeline check\n", cfg.output.storage_options)
        fs, path = storage.filesystem(probe, cfg.output.storage_options)
        fs.delete_file(path)
    except (OSError, PipelineError) as exc:
        return Check("output.publish", False, f"cannot write to {dest}: {exc}; create the bucket or fix its "
                                              "credentials before the run (it publishes after paying)", EXIT_USAGE)
    return Check("output.publish", True, f"{dest} accepts a file (probe written and removed)")


def print_checks(checks: list[Check], out: TextIO | None = None, *, as_json: bool = False) -> int:
    out = out or sys.stdout
    failed = [c for c in checks if not c.ok]
    # Something to change (2) says more than something to wait for (3).
    code = EXIT_USAGE if any(c.exit_code == EXIT_USAGE for c in failed) else EXIT_STOPPED if failed else EXIT_OK
    if as_json:
        out.write(orjson.dumps({"ok": not failed, "exit_code": code,
                                "checks": [c.__dict__ for c in checks]}).decode() + "\n")
        return code
    for c in checks:
        out.write(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<20} {printable(c.detail)}\n")  # server text in it
    out.write("ready to run\n" if not failed else f"{len(failed)} check(s) failed: fix them before the run\n")
    return code
