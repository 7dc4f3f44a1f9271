"""Resume at scale: how fast does a 1,000,000-row job that is 99% done start sending again, in how much memory?

The 99%-done state is built directly with the runner's own pieces (JobDir manifest -> reader ->
RequestBuilder.build_batch -> Store -> write_part under the batch's content name), so the request keys
and part names are exactly the ones `pipeline run` computes:
the first 99% of the batches have complete parts and stored answers, the next few batches have half
their answers stored and no parts (a run killed mid-batch), the rest were never started. Then
`python -m pipeline run job.yaml -q` is started as a child process against a zero-latency simulator in
this process, and we measure: time from starting the child to the first request reaching the
simulator, wall time to the end (sends the missing rows, merges 1,000,000 rows of outputs), and the
child's peak RSS (wait4's ru_maxrss). Between rounds the state is put back to 99% done.

    python benchmarks/resume_scale.py                    # 1,000,000 rows, 99% done, 3 rounds
    python benchmarks/resume_scale.py -n 200000 --rounds 1
    python benchmarks/resume_scale.py --workdir /tmp/rs  # keep the built state and reuse it next time
    python benchmarks/resume_scale.py --real 20000       # also time the real pipeline on N fresh rows

Everything lives in a temp folder (removed at the end unless --workdir is given). The page cache is
warm (the state was just written), as on a machine that resumes soon after being stopped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from _common import REPO, cleanup, job_config, print_machine, scratch, table, write_rows

from pipeline.common.parts import part_context, part_names, part_number
from pipeline.config import load_config
from pipeline.prepare.prompts import Renderer
from pipeline.prepare.request import RequestBuilder
from pipeline.prepare.structured import StructuredPlan, plan_for
from pipeline.read.reader import Source
from pipeline.state.jobdir import JobDir
from pipeline.state.store import Store
from pipeline.vocab import Record
from pipeline.write.output import OutputColumns, write_part
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread

OPEN_BATCHES = 4  # batches a killed run leaves half-answered (the runner keeps about this many open)
ANSWER = '{"sentiment":"positive","score":4,"tags":["delivery","quality"]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_raw(key: str) -> bytes:
    """A chat.completion body of the size the simulator sends (~0.7 kB), so the store has a real size."""
    return orjson.dumps({
        "id": f"gen-{key[:24]}", "object": "chat.completion", "created": 1764000000, "model": "openai/gpt-4-turbo",
        "provider": "OpenAI", "system_fingerprint": "fp_sim",
        "choices": [{"index": 0, "finish_reason": "stop", "native_finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": ANSWER, "refusal": None, "reasoning": None}}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 19, "total_tokens": 50, "cost": 0.00088,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
    })


def record(key: str) -> Record:
    return Record(key=key, state="ok", status=200, content=ANSWER, output_json=ANSWER, finish_reason="stop",
                  model="openai/gpt-4-turbo", provider="OpenAI", prompt_tokens=31, completion_tokens=19,
                  cost_usd=0.00088, latency_s=0.01, raw=fake_raw(key))


def build(work: Path, n: int, done: float, batch_size: int) -> dict[str, Any]:
    t0 = time.monotonic()
    data = write_rows(work / "in.jsonl", n)
    port = free_port()
    cfg_dict = job_config(data, work / "out", f"http://127.0.0.1:{port}/api/v1", concurrency=64,
                          input={"batch_size": batch_size})
    cfg_path = work / "job.yaml"
    cfg_path.write_bytes(orjson.dumps(cfg_dict, option=orjson.OPT_INDENT_2))
    cfg = load_config(str(cfg_path))
    jobdir = JobDir(cfg.output.dir)
    jobdir.lock()
    manifest = jobdir.check_job(cfg, force_new=False, config_path=str(cfg_path))
    source = Source(cfg.input)
    scan = source.scan()
    renderer = Renderer(cfg, input_dir=str(data.parent), columns=scan.columns)
    assert cfg.structured is not None
    plan = make_plan(cfg)
    store = Store(jobdir.store_path)
    jobdir.bind_store(store, manifest)
    store.set_meta("structured_mode", plan.mode)  # the mode a resume will shape requests for
    layout = OutputColumns(id_column="rid", schema=plan.schema, compression=cfg.output.compression)
    names = part_names(scan.digests, part_context(scan.carried_types, "rid", layout))
    jobdir.record_input(manifest, scan.rows, names)
    n_batches = -(-n // batch_size)
    done_batches = int(n_batches * done)
    kept: list[str] = []  # answers stored for the half-answered batches (the reset keeps these)
    stored = 0
    for batch in source.batches():
        if batch.index >= done_batches + OPEN_BATCHES:
            break
        built = RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens).build_batch(batch, renderer)
        outcomes, row_keys, jobs = built.failures, built.keys, built.requests
        if batch.index < done_batches:
            records = {k: record(k) for k in jobs}
            store.put_now(records.values())
            write_part(jobdir.parts, names[batch.index], layout, batch.carried,
                       [records[k] if k else o for k, o in zip(row_keys, outcomes)])
            store.put_part(part_number(names[batch.index]), ok=len(records), failed=0, failed_transient=0,
                           request_failed=0)
        else:
            half = list(jobs)[: len(jobs) // 2]
            store.put_now(record(k) for k in half)
            kept += half
        stored += len(jobs)
        if batch.index % 100 == 0:
            print(f"  built batch {batch.index}/{done_batches + OPEN_BATCHES} "
                  f"({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
    store.close()
    jobdir.unlock()
    state = {"n": n, "done_batches": done_batches, "n_batches": n_batches, "batch_size": batch_size,
             "port": port, "kept": kept, "open_parts": names[done_batches:], "build_s": round(time.monotonic() - t0, 1),
             "store_mb": round(os.path.getsize(jobdir.store_path) / 2**20)}
    (work / "state.json").write_bytes(orjson.dumps(state))
    return state


def make_plan(cfg: Any) -> StructuredPlan:
    """The structured plan exactly as run_async builds it (the request keys depend on it)."""
    plan = plan_for(cfg)
    assert plan is not None
    return plan


def reset(work: Path, state: dict[str, Any]) -> None:
    """Back to 99% done: drop what the last round added (parts, outputs, answers of the open batches)."""
    out = work / "out"
    open_parts = set(state["open_parts"])
    for name in os.listdir(out / "parts"):
        if name[:16] in open_parts:
            os.unlink(out / "parts" / name)
    for name in ("results.parquet", "failures.parquet", "summary.json"):
        (out / name).unlink(missing_ok=True)
    store = Store(str(out / "store.sqlite"))
    keep = set(state["kept"])
    cfg = load_config(str(work / "job.yaml"))
    source = Source(cfg.input)
    renderer = Renderer(cfg, columns=source.scan().columns)
    assert cfg.structured is not None
    plan = make_plan(cfg)
    plan.mode = store.get_meta("structured_mode") or plan.mode
    drop: list[str] = []
    for batch in source.batches(skip=lambda i: i < state["done_batches"]):
        jobs = RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens).build_batch(batch, renderer).requests
        drop += [k for k in jobs if k not in keep]
    store._db.execute("BEGIN")
    store._db.executemany("DELETE FROM responses WHERE key = ?", [(k,) for k in drop])
    store._db.execute("COMMIT")
    store.forget_parts(part_number(name) for name in open_parts)
    store.close()


def measure(work: Path, state: dict[str, Any]) -> dict[str, float]:
    sim = SimulatorThread(SimConfig(no_json_schema_models=[], log_limit=1000), port=state["port"])
    sim.start()
    try:
        acct = sim.sim.service.acct
        first = None
        with open(work / "stderr.txt", "wb") as err:
            t0 = time.time()
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(work / "job.yaml"), "-q"],
                                    cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
            while True:
                if first is None and acct.requests:
                    first = acct.log[0].time - t0
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)  # reaps it, with its peak RSS
                if pid:
                    break
                time.sleep(0.002)
            wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"resume exited {proc.returncode}: {(work / 'stderr.txt').read_text()[-2000:]}")
        summary = orjson.loads((work / "out" / "summary.json").read_bytes())
        expected = (state["n"] - state["done_batches"] * state["batch_size"]) - len(state["kept"])
        if summary["requests_sent"] != expected:  # the built state's keys do not match the runner's
            raise RuntimeError(f"the resume sent {summary['requests_sent']} requests, expected {expected}")
        return {"first_request_s": first if first is not None else float("nan"), "wall_s": wall,
                "peak_rss_mb": rusage.ru_maxrss / 1024, "requests": summary["requests_sent"],
                "rows": summary["succeeded"], "resumed_rows": summary["resumed_rows"]}
    finally:
        sim.stop()


def phases(work: Path) -> list[list[Any]]:
    """Where start-up time goes, timed in this process with the same calls the runner makes."""
    rows: list[list[Any]] = []
    t = time.perf_counter()
    cfg = load_config(str(work / "job.yaml"))
    source = Source(cfg.input)
    scan = source.scan()
    rows.append(["input scan (count rows, check ids)", time.perf_counter() - t])
    t = time.perf_counter()
    store = Store(str(work / "out" / "store.sqlite"))
    totals = store.totals()
    rows.append(["store open + totals", time.perf_counter() - t])
    t = time.perf_counter()
    jobdir = JobDir(cfg.output.dir)
    names = (jobdir.read_manifest() or {}).get("batches", [])
    skip, reused = jobdir.reusable(store, names, retry_failed=False)
    rows.append([f"reusable parts ({len(skip)}) and their rows ({reused.ok + reused.failed:,})",
                 time.perf_counter() - t])
    store.close()
    del totals, scan
    return rows


def real_run(n: int) -> list[Any]:
    """The real pipeline over n fresh rows against a zero-latency simulator (to extrapolate to 1M)."""
    import pipeline

    work = scratch("resume-real")
    try:
        data = write_rows(work / "in.jsonl", n)
        with SimulatorThread(SimConfig(no_json_schema_models=[], log_limit=1000)) as url:
            cfg = job_config(data, work / "out", url, concurrency=128)
            t = time.monotonic()
            s = pipeline.run(cfg, quiet=True)
            wall = time.monotonic() - t
        return [f"real pipeline, {n:,} rows from scratch", wall, s.succeeded / wall, 1_000_000 / (s.succeeded / wall)]
    finally:
        cleanup(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="input rows (default 1,000,000)")
    ap.add_argument("--done", type=float, default=0.99, help="share of batches already complete (default 0.99)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep the built state here and reuse it if present")
    ap.add_argument("--real", type=int, default=0, metavar="N", help="also time the real pipeline on N rows")
    args = ap.parse_args()
    print_machine()
    work = args.workdir or scratch("resume-scale")
    work.mkdir(parents=True, exist_ok=True)
    try:
        state_file = work / "state.json"
        state = orjson.loads(state_file.read_bytes()) if state_file.exists() else None
        if state is None or state["n"] != args.n or state["batch_size"] != args.batch_size:
            shutil.rmtree(work / "out", ignore_errors=True)
            print(f"building a {args.done:.0%}-done job of {args.n:,} rows in {work} ...", file=sys.stderr)
            state = build(work, args.n, args.done, args.batch_size)
        else:
            reset(work, state)
        print(f"state: {state['n']:,} rows, {state['done_batches']}/{state['n_batches']} batches complete, "
              f"{OPEN_BATCHES} half-answered, store {state['store_mb']} MB, built in {state['build_s']}s")
        results = []
        for r in range(args.rounds):
            if r:
                reset(work, state)
            m = measure(work, state)
            results.append([r + 1, m["first_request_s"], m["wall_s"], m["peak_rss_mb"], m["requests"], m["rows"],
                            m["resumed_rows"]])
        print(table(["round", "first request (s)", "resume to end (s)", "peak RSS (MB)", "requests sent",
                     "rows out", "rows resumed"], results))
        print(table(["start-up phase (in-process, warm)", "s"], phases(work)))
        if args.real:
            print(table(["run", "wall (s)", "rows/s", "1M rows would take (s)"], [real_run(args.real)]))
    finally:
        if args.workdir is None:
            cleanup(work)


if __name__ == "__main__":
    main()
