"""Start-up: wall time of `pipeline --help` and of a 1-row `pipeline run`, median of 5 (fresh processes).

The 1-row run goes to the minimal endpoint of overhead.py, already running in its own process, so
the figure is the pipeline's own start-up (imports, config, scan, store, one request, Parquet outputs,
summary) and not a server's; a second row uses `endpoint.base_url: simulator`, which starts the
built-in simulator inside the run, as the demo config does. `python -X importtime` shows where the
import time of a run goes (top modules by cumulative import time).

    python benchmarks/startup.py
    python benchmarks/startup.py --repeat 9 --importtime 15
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    API_KEY_ENV,
    cleanup,
    endpoint,
    job_config,
    median,
    print_machine,
    scratch,
    table,
    write_rows,
)


def pipeline_cmd() -> list[str]:
    exe = shutil.which("pipeline")
    return [exe] if exe else [sys.executable, "-m", "pipeline"]


def timed(cmd: list[str], *, ok_codes: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "0"})
    wall = time.perf_counter() - t0
    if proc.returncode not in ok_codes:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall


def import_times(module: str, top: int) -> tuple[float, list[list[object]]]:
    """(total ms, the heaviest top-level packages by cumulative import time, wherever first imported).

    Best of 3 runs (by total), so a cold page cache or a busy neighbour does not make the table."""
    runs = [subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                           text=True).stderr for _ in range(3)]
    best = min(runs, key=lambda err: _total(err, module))
    return _table(best, module, top)


def _total(stderr: str, module: str) -> int:
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) == module.split(".")[0]:
            return int(m.group(1))
    return 1 << 60


def _table(stderr: str, module: str, top: int) -> tuple[float, list[list[object]]]:
    seen: dict[str, tuple[int, int]] = {}
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if not m:
            continue
        own, cum, name = int(m.group(1)), int(m.group(2)), m.group(3)
        if name == module.split(".")[0] or name == module:
            total = max(total, cum)
        if "." not in name and not name.startswith("_") and name != module.split(".")[0]:
            seen[name] = max(seen.get(name, (0, 0)), (cum, own))
    heavy = sorted(seen.items(), key=lambda kv: -kv[1][0])[:top]
    return total / 1000, [[name, cum / 1000, f"{cum / total:.0%}" if total else "-"] for name, (cum, _) in heavy]


def main() -> None:
    ap = argparse.ArgumentParser(description="wall time of `pipeline --help` and a 1-row run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--importtime", type=int, default=12, help="rows of the import-time table (0: skip)")
    args = ap.parse_args()
    print_machine()
    cmd = pipeline_cmd()
    tmp = scratch("startup")
    data = write_rows(tmp / "one.jsonl", 1)
    rows = []
    try:
        with endpoint() as server:
            configs = {
                "1-row run, endpoint in its own process": job_config(data, tmp / "out-http", server.base_url),
                "1-row run, endpoint.base_url: simulator": job_config(data, tmp / "out-sim", "simulator"),
            }
            measured: dict[str, list[float]] = {"pipeline --help": [], "python -c 'import pipeline'": []}
            measured.update({k: [] for k in configs})
            paths = {}
            for name, cfg in configs.items():
                path = tmp / (re.sub(r"\W+", "-", name) + ".yaml")
                path.write_text(json.dumps(cfg))  # JSON is valid YAML
                paths[name] = path
            timed(cmd + ["--help"])  # warm the page cache and .pyc files
            for _ in range(args.repeat):
                measured["pipeline --help"].append(timed(cmd + ["--help"]))
                measured["python -c 'import pipeline'"].append(timed([sys.executable, "-c", "import pipeline"]))
                for name, cfg in configs.items():
                    cleanup(Path(cfg["output"]["dir"]))
                    measured[name].append(timed(cmd + ["run", str(paths[name]), "-q"]))
        for name, xs in measured.items():
            rows.append([name, median(xs), min(xs), max(xs)])
        print(f"\ncommand: {' '.join(cmd)}; median of {args.repeat} fresh processes; key from ${API_KEY_ENV}")
        print(table(["what", "median s", "min s", "max s"], rows))
        if args.importtime:
            total, heavy = import_times("pipeline.engines.runner", args.importtime)
            print(f"\n`import pipeline.engines.runner` (what a run imports) takes {total:.0f} ms; heaviest packages "
                  "(nested imports overlap):")
            print(table(["package", "cumulative ms", "share"], heavy))
    finally:
        cleanup(tmp)


if __name__ == "__main__":
    main()
