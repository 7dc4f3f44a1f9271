"""The hot path across revisions: whole-process client CPU per request and peak RSS, same run, same endpoint.

nginx serves one fixed tool-call `chat.completion` (the benchmarks' answer, benchmarks/_endpoint.py's BODY)
on 127.0.0.1 from its own processes, so the server costs the client nothing and answers as fast as a
static file. Each client is a fresh Python process: a bare aiohttp + semaphore loop (the floor), and the
whole pipeline (`pipeline.run(cfg)`: read, render, shape, key, count tokens, limit, send, classify, scrub,
store, parts, merge) at each revision asked for, checked out with `git worktree add` into a scratch folder.
Rounds alternate the clients (this machine is shared and noisy); the table gives medians and each
pipeline's ratio to the first revision, taken per round.

    python benchmarks/hotpath.py                                  # bcc0fcc vs the working tree, 20k requests
    python benchmarks/hotpath.py --rev bcc0fcc --rev main --rev WORKTREE -n 20000 --rounds 3 --concurrency 256

Client CPU is the child's own user+system time (getrusage of the reaped child: every thread, the store's
fsync thread and Arrow's writers included); peak RSS is its ru_maxrss. Needs `nginx` on PATH (apt-get
install nginx); nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import SCHEMA, median, print_machine, table, write_rows  # noqa: E402
from _endpoint import BODY  # noqa: E402
from overhead import PAYLOAD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"  # the checkout this script runs from, uncommitted changes included

BARE = r"""
import asyncio, sys, aiohttp, orjson
base_url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = open(sys.argv[4], "rb").read()
async def main():
    sem, ok = asyncio.Semaphore(concurrency), 0
    headers = {"Authorization": "Bearer sk-bench-local", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as s:
        async def one():
            nonlocal ok
            try:
                async with s.post(base_url + "/chat/completions", data=payload) as r:
                    if r.status == 200 and orjson.loads(await r.read())["choices"]:
                        ok += 1
            finally:
                sem.release()
        tasks = set()
        for _ in range(n):
            await sem.acquire()
            t = asyncio.create_task(one()); tasks.add(t); t.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
    print(ok)
asyncio.run(main())
"""

PIPELINE = r"""
import json, os, sys
import pipeline
assert os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))) == os.getcwd(), pipeline.__file__
summary = pipeline.run(json.load(open(sys.argv[1])))
print(summary.succeeded)
"""

# The bare loop sends overhead.py's PAYLOAD: the pipeline's tool-mode request for one generated row.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx on 127.0.0.1:PORT answering every request with BODY (`return 200`, so POST works too)."""

    def __init__(self, scratch: Path) -> None:
        self.dir = scratch / "nginx"
        (self.dir / "logs").mkdir(parents=True)
        self.port = free_port()
        body = BODY.decode().replace("\\", "\\\\").replace("'", "\\'")
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/logs/error.log crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("nginx did not start: " + (self.proc.stderr.read() or b"").decode()[-2000:])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def checkout(rev: str, scratch: Path) -> Path:
    """A clean checkout of `rev` (WORKTREE: this one, as it is)."""
    if rev == WORKTREE:
        return REPO
    dest = scratch / f"rev-{rev.replace('/', '_')}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), rev], check=True,
                   capture_output=True)
    return dest


def child(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run one client; its own CPU and peak RSS from the reaped child's rusage. It runs in `cwd`, its own
    checkout: `python -c` puts the working directory first on sys.path, so from anywhere else every
    revision would import the pipeline of whatever checkout the script was started in."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "done": float(out.strip().splitlines()[-1]) if out.strip() else 0.0}


def config(data: Path, out: Path, base_url: str, concurrency: int) -> dict[str, Any]:
    return {
        "input": {"path": str(data), "id_column": "rid", "columns": ["stars"]},
        "endpoint": {"base_url": base_url, "model": "openai/gpt-4-turbo", "api_key_env": "BENCH_API_KEY"},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 200},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrency": concurrency},
        "output": {"dir": str(out)},
        "run": {"progress": False},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", help=f"a git revision, or {WORKTREE} (default: bcc0fcc, {WORKTREE})")
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=256)
    args = ap.parse_args()
    revs = args.rev or ["bcc0fcc", WORKTREE]
    if shutil.which("nginx") is None:
        raise SystemExit("needs nginx on PATH: apt-get install nginx")
    print_machine()
    scratch = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    server = Nginx(scratch)
    trees = {rev: checkout(rev, scratch) for rev in revs}
    try:
        data = write_rows(scratch / "in.jsonl", args.n)
        (scratch / "payload.json").write_bytes(PAYLOAD)
        base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"BENCH_API_KEY": "sk-bench-local"}
        runs: dict[str, list[dict[str, float]]] = {}
        for r in range(1, args.rounds + 1):
            clients: list[tuple[str, list[str], dict[str, str], Path]] = [
                ("bare aiohttp", [sys.executable, "-c", BARE, server.base_url, str(args.n), str(args.concurrency),
                                  str(scratch / "payload.json")], base_env, scratch)]
            for rev, tree in trees.items():
                cfg_path = scratch / f"cfg-{len(clients)}.json"
                out = scratch / f"out-{len(clients)}"
                shutil.rmtree(out, ignore_errors=True)
                cfg_path.write_text(json.dumps(config(data, out, server.base_url, args.concurrency)))
                clients.append((f"pipeline @ {rev}", [sys.executable, "-c", PIPELINE, str(cfg_path)],
                                base_env | {"PYTHONPATH": str(tree)}, tree))
            for name, cmd, env, cwd in clients:
                m = child(cmd, env, cwd)
                runs.setdefault(name, []).append(m)
                print(f"round {r}: {name}: {args.n / m['wall']:,.0f} req/s, {1000 * m['cpu'] / args.n:.3f} ms CPU/req, "
                      f"{m['rss_mb']:.0f} MB peak RSS", flush=True)
        first = f"pipeline @ {revs[0]}"
        rows = []
        for name, ms in runs.items():
            ratio = [m["cpu"] / f["cpu"] for m, f in zip(ms, runs[first])]
            rows.append([name, round(median([args.n / m["wall"] for m in ms])),
                         round(median([1000 * m["cpu"] / args.n for m in ms]), 3),
                         round(median([m["rss_mb"] for m in ms])), round(median(ratio), 2)])
        print(f"\n{args.n:,} requests per client, concurrency {args.concurrency}, {args.rounds} rounds, medians; "
              f"nginx static endpoint")
        print(table(["client", "req/s", "client CPU ms/req", "peak RSS MB", f"CPU vs {revs[0]}"], rows))
    finally:
        server.stop()
        for tree in trees.values():
            if tree != REPO:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
