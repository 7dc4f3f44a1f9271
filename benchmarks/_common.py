"""Shared helpers for the benchmark scripts: child servers, CPU accounting, inputs, configs, tables."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The schema the endpoint's fixed answer satisfies (same as tests/conftest.py).
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "score"],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
API_KEY_ENV = "BENCH_API_KEY"
os.environ.setdefault(API_KEY_ENV, "sk-bench-local")  # a dummy key for the loopback endpoints


def machine() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"nproc": str(os.cpu_count()), "affinity": str(len(os.sched_getaffinity(0))), "cpu": model,
           "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("aiohttp", "orjson", "pyarrow", "jsonschema", "uvloop"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return out


def print_machine() -> None:
    m = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))


class Child:
    """A server in its own process; prints its base URL as the first stdout line."""

    def __init__(self, argv: list[str], *, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO),
                                     text=True)
        deadline = time.monotonic() + timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
            if line.startswith("http://127.0.0.1:"):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {argv} exited with {self.proc.returncode}")
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"server {argv} printed no URL")
        self.base_url = line

    def cpu_s(self) -> float:
        """user+system CPU seconds the server process has used so far (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def endpoint(latency_ms: float = 0.0, uvloop: bool = False) -> Child:
    argv = [sys.executable, str(HERE / "_endpoint.py"), "--port", "0", "--latency-ms", str(latency_ms)]
    return Child(argv + (["--uvloop"] if uvloop else []))


def simulator(*flags: str) -> Child:
    return Child([sys.executable, "-m", "pipeline", "simulate", "--port", "0", *flags])


def write_rows(path: Path, n: int) -> Path:
    """n JSONL rows shaped like tests/conftest.py's (rid, text, stars), each text distinct."""
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as fh:
        chunk: list[str] = []
        for i in range(n):
            text = f"review number {i}: works fine, arrived late"
            chunk.append(f'{{"rid":"r{i:07d}","text":"{text}","stars":{i % 5 + 1}}}\n')
            if len(chunk) >= 10_000:
                fh.write("".join(chunk))
                chunk.clear()
        fh.write("".join(chunk))
    return path


def job_config(data: Path, out: Path, base_url: str, *, concurrency: int = 128, rpm: float | None = None,
               tpm: float | None = None, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": str(data), "id_column": "rid", "columns": ["stars"]},
        "endpoint": {"base_url": base_url, "model": "openai/gpt-4-turbo", "api_key_env": API_KEY_ENV},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 200},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": rpm, "tokens_per_minute": tpm, "max_concurrency": concurrency},
        "output": {"dir": str(out)},
        "run": {"progress": False},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def scratch(name: str) -> Path:
    """A fresh scratch folder (removed by cleanup())."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    return path


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    numeric = [[isinstance(c, (int, float)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str], right: list[bool]) -> str:
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)) + " |"

    out = [line(headers, [False] * len(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c, r) for c, r in zip(cells, numeric)]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class Probe:
    """A Transport wrapper for `pipeline.run_async(cfg, transport=...)` that records every attempt.

    Keeps (sent_at, answered_at, status, tokens) per attempt on the loop's clock; `tokens` (prompt +
    completion from the answer's usage) only when `count_tokens`. Costs ~2 us per request.
    """

    def __init__(self, inner: Any, *, count_tokens: bool = False) -> None:
        self.inner = inner
        self.count_tokens = count_tokens
        self.events: list[tuple[float, float, int, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, payload: bytes, *, stream: bool = False) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = await self.inner.send(payload, stream=stream)
        finally:
            self.in_flight -= 1
        tokens = 0
        if self.count_tokens and reply.status == 200:
            import orjson

            usage = (orjson.loads(reply.body) or {}).get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        self.events.append((t0, loop.time(), reply.status, tokens))
        return reply

    async def close(self) -> None:
        await self.inner.close()

    def span(self) -> tuple[float, float]:
        """(first send, last answer)."""
        return min(e[0] for e in self.events), max(e[1] for e in self.events)

    def mean_in_flight(self) -> float:
        first, last = self.span()
        return sum(e[1] - e[0] for e in self.events) / (last - first)


def http_transport(base_url: str, concurrency: int) -> Any:
    """The pipeline's own HttpTransport, built as the runner builds it for these benchmark configs."""
    from pipeline.send.transport import HttpTransport

    return HttpTransport(base_url=base_url, api_key=os.environ[API_KEY_ENV], pool_size=concurrency)


def run_probed(cfg_dict: dict[str, Any], probe: Probe) -> Any:
    """pipeline.run_async on a fresh loop with the probe as its transport; returns the Summary."""
    import asyncio

    from pipeline.config import load_config
    from pipeline.engines.runner import run_async

    return asyncio.run(run_async(load_config(cfg_dict), transport=probe, quiet=True))


def vm(field: str) -> float:
    """A /proc/self/status field in MB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class FakeTransport:
    """A Transport with no socket: answers every request at once with the endpoint's fixed tool-call body."""

    def __init__(self) -> None:
        from _endpoint import BODY

        from pipeline.send.transport import Reply

        self.reply = Reply(200, {"Content-Type": "application/json"}, BODY, 0.0)
        self.sent = 0

    async def send(self, payload: bytes, *, stream: bool = False) -> Any:
        self.sent += 1
        return self.reply

    async def close(self) -> None:
        return None
