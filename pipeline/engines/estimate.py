"""`pipeline run CONFIG --dry-run`: what a run would send, cost and take, without sending anything.

The input is read and every request built by the runner's own code (`RequestBuilder.build_batch`), one
batch at a time, so the figures are those of the real run: the same request keys (identical requests
counted once, rows already answered in `output.dir` or the shared cache left out), the same prompt
token counts the tokens/minute limiter and the budget use (prepare/tokens.py: exact for OpenAI models,
calibrated by this job's earlier answers for others; images by the tile rule) and the same per-row
failures. Prices come from models/prices.py, each with its source. `--json` prints the same figures
as one JSON object (engines/estimate_json.py), and the text report ends with the first request as it
would be sent. Nothing goes to the network, no API key is needed, and nothing is
written: the store is opened read-only (engines/estimate_store.py: SQLite `immutable` when no run is
writing it, so not even its -wal/-shm files appear).

Output tokens are a range, 0 to max_tokens per request (the model's output cap when max_tokens is
unset). The "likely" figure is the mean completion tokens of the answers this job (or the shared cache)
already holds: a measured number from the same prompt and model, or none at all rather than a guess.
Time is bounded separately by requests/minute, tokens/minute and concurrency x an assumed latency;
the slowest bound is the estimate, and the assumption is printed next to it.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..common import redact
from ..config import Config, day_note
from ..errors import EXIT_OK, RowError
from ..models.catalog import context_window, max_output_tokens
from ..models.prices import find_price
from ..prepare.packs import Packer
from ..prepare.prompts import Renderer
from ..prepare.request import RequestBuilder
from ..prepare.structured import StructuredPlan, plan_for
from ..prepare.tokens import CALIBRATION_META, counter_for
from ..read.reader import Source
from ..send.budget import worst_output_tokens
from ..state.jobdir import JobDir
from ..vocab import BuiltBatch, InputBatch, Request
from .estimate_cascade import Escalation, describe, extra_cost
from .estimate_store import final_states, job_store, likely_output, meta, open_readonly, spent_before

# Latency assumed for a real endpoint: time to the first token plus the output at ~33 tokens/s, which is
# what gpt-4-turbo typically sustains on OpenRouter and OpenAI. Printed with the figure it produces.
FIRST_TOKEN_S = 0.6
SECONDS_PER_OUTPUT_TOKEN = 0.03
MAX_EXAMPLES = 5
# Request keys remembered to count identical requests once (8 bytes of key each, ~70 bytes in a set):
# past this many the count may include a few repeats, but memory stays bounded.
MAX_KEYS_TRACKED = 2_000_000

log = logging.getLogger("pipeline")


@dataclass
class Estimate:
    """The dry run's figures; `report()` formats them. Token and cost figures cover requests to send."""

    rows_total: int = 0
    rows_done_ok: int = 0           # already answered in output.dir (results)
    rows_done_failed: int = 0       # already recorded as failed there (a resume does not re-ask them)
    rows_cached: int = 0            # answered by the shared cache.dir: free
    rows_failing: int = 0           # cannot become a request
    failing_by_reason: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rows_to_send: int = 0
    requests: int = 0               # requests to send for rows_to_send (packs, with rows_per_request > 1)
    distinct: int = 0               # distinct row requests among rows_to_send (identical rows asked once)
    prompt_tokens: int = 0
    images: int = 0
    image_tokens: int = 0
    output_max: int = 0
    output_likely_per_request: float | None = None
    likely_basis: str = ""
    notes: list[str] = field(default_factory=list)
    token_method: str = ""
    example: bytes | None = None    # the first request to send, as its canonical payload
    shared_prefix: int | None = None  # prompt tokens every request shares (engines/savings.py)
    cache_notes: list[str] = field(default_factory=list)  # what keeps shared text from being cached
    escalation: Escalation = field(default_factory=Escalation)  # a cascade's first stage (estimate_cascade.py)


def dry_run(cfg: Config, out: TextIO, *, as_json: bool = False, compare: bool = False) -> int:
    """Print the estimate (text, or one JSON object); 0 (config and input errors raise, the CLI exits 2).
    `compare`: the run modes side by side as well (engines/savings.py)."""
    from .estimate_json import example_request, to_json
    from .savings import compare_lines

    est = estimate(cfg)
    # The example request carries the config's secret values (`!secret`, `!env`) as sent: masked here.
    if as_json:
        out.write(redact.scrub(to_json(est, cfg, compare=compare) + "\n"))
    else:
        out.write(redact.scrub(report(est, cfg) + (compare_lines(est, cfg) if compare else "")
                               + example_request(est, cfg)))
    return EXIT_OK


def estimate(cfg: Config) -> Estimate:
    cfg = cfg.model_copy(deep=True)  # the job's own batch size may replace the configured one
    est = Estimate()
    if cfg.run.engine == "ray":  # before the scan, as the runner does (read-only)
        from .ray.plan import RayJob
        RayJob(cfg).adopt_batch_size(cfg)
    else:
        JobDir(cfg.output.dir).adopt_batch_size(cfg)
    source = Source(cfg.input)
    scan = source.scan()
    est.rows_total = scan.rows
    if (note := day_note(cfg, scan.rows)) is not None:
        log.warning(note, extra={"event": "slow_limit"})
    renderer = Renderer(cfg, input_dir=str(Path(source.files[0]).parent) if source.files else None,
                        columns=scan.columns)
    plan = plan_for(cfg)
    store = job_store(cfg, est.notes)
    renderer.tokens = counter_for(cfg.endpoint.model, meta(store, CALIBRATION_META) if store is not None else None)
    est.token_method = renderer.tokens.method
    cache = open_readonly(os.path.join(cfg.cache.dir, "cache.sqlite")) if cfg.cache.dir else None
    try:
        if plan is not None and store is not None and (mode := meta(store, "structured_mode")):
            plan.mode = mode  # as the runner does: an earlier run already learned the structured mode
        asker = _Asker.of(cfg, plan, renderer)
        seen: set[int] = set()
        # Every batch is rendered: the store says which requests are answered (the input may have changed).
        for batch in source.batches():
            _batch(batch, renderer, asker, cfg, store, cache, seen, est)
        # The shared part of a row's request; a pack starts with the same shared part (prepare/packs.py).
        est.shared_prefix, est.cache_notes = asker.builder.shared_prefix, renderer.cache_notes()
        est.output_likely_per_request, est.likely_basis = likely_output(store, cache)
    finally:
        for db in (store, cache):
            if db is not None:
                db.close()
    return est


@dataclass(slots=True)
class _Asker:
    """How the run turns rows into requests: the row builder, and with prompt.rows_per_request > 1 the
    packer (rows under their packed keys, sent in packs)."""

    builder: RequestBuilder
    packer: Packer | None

    @classmethod
    def of(cls, cfg: Config, plan: StructuredPlan | None, renderer: Renderer) -> _Asker:
        return cls(RequestBuilder(cfg.endpoint.base_url, plan, renderer.tokens), Packer.of(cfg, plan, renderer.tokens))

    def build(self, batch: InputBatch, renderer: Renderer) -> BuiltBatch:
        built = self.builder.build_batch(batch, renderer)
        return Packer.rekey(built) if self.packer is not None else built

    def requests(self, rows: list[Request]) -> list[Request]:
        return [p.request for p in self.packer.packs(rows) if p.request is not None] \
            if self.packer is not None and rows else rows


def _batch(batch: InputBatch, renderer: Renderer, asker: _Asker, cfg: Config,
           store: sqlite3.Connection | None, cache: sqlite3.Connection | None, seen: set[int], est: Estimate) -> None:
    # Outcomes are not kept: a failing row's reason is re-derived in _failing.
    built = asker.build(batch, renderer)
    row_keys, jobs = built.keys, built.requests
    answered = final_states(store, jobs.keys())
    if cfg.cascade:
        est.escalation.add(store, jobs.keys(), cfg.cascade[0].min_confidence)
    cached = {k for k, s in final_states(cache, [k for k in jobs if k not in answered]).items() if s == "ok"}
    for i, key in enumerate(row_keys):
        if key is None:
            _failing(batch, i, renderer, est)
        elif key in answered:
            if answered[key] == "ok":
                est.rows_done_ok += 1
            else:
                est.rows_done_failed += 1
        elif key in cached:
            est.rows_cached += 1
        else:
            est.rows_to_send += 1
    fresh = []
    for key, job in jobs.items():
        short = int(key[:16], 16)
        if key in answered or key in cached or short in seen:
            continue
        if len(seen) < MAX_KEYS_TRACKED:
            seen.add(short)
        fresh.append(job)
    est.distinct += len(fresh)
    for job in asker.requests(fresh):
        if est.example is None:
            est.example = job.payload
        est.requests += 1
        est.prompt_tokens += job.est_prompt
        est.images += job.n_images
        est.image_tokens += job.image_tokens
        est.output_max += worst_output_tokens(cfg, job.est_prompt, job.max_tokens)


def _failing(batch: InputBatch, i: int, renderer: Renderer, est: Estimate) -> None:
    """Count a row that cannot become a request, by reason; the render is repeated to get the reason."""
    err = batch.errors[i]
    if err is None:
        try:
            renderer.render(batch.rows[i], batch.origins[i])
        except RowError as exc:
            err = exc
    reason = getattr(err, "reason", "input") if err is not None else "input"
    est.rows_failing += 1
    est.failing_by_reason[reason] += 1
    if len(est.examples) < MAX_EXAMPLES:
        where = f"{err.file} row {err.row}" if err is not None and err.file else f"row id {batch.ids[i]}"
        message = err.message if err is not None else "cannot be rendered"
        est.examples.append(f"{where}: [{reason}] {message}")


# -- cost and time ---------------------------------------------------------------------------------


def cost_range(est: Estimate, cfg: Config) -> tuple[float, float | None, float] | None:
    """(no output, likely, max output) in USD for the requests to send, at the run mode's prices (batch,
    flex); None without a price."""
    batch = cfg.run.mode == "batch"
    price = find_price(cfg, cfg.endpoint.model, batch=batch)
    if price is None:
        return None
    base = est.prompt_tokens * price.input_per_m / 1e6 + est.images * price.per_image
    likely = (None if est.output_likely_per_request is None else
              base + est.requests * est.output_likely_per_request * price.output_per_m / 1e6)
    # The dearest fallback model bounds the top of the range: OpenRouter bills the model that served.
    dearest = max((p for m in cfg.params.models or [] if (p := find_price(cfg, m, batch=batch))),
                  key=lambda p: (p.input_per_m, p.output_per_m), default=price)
    top = max(price, dearest, key=lambda p: (p.input_per_m, p.output_per_m))
    high = (est.prompt_tokens * top.input_per_m / 1e6 + est.images * top.per_image
            + est.output_max * top.output_per_m / 1e6)
    if cfg.cascade or cfg.quality.audit or cfg.quality.confidence == "votes":  # later stages, the audit, votes
        extra = extra_cost(est, cfg)
        if extra is None:
            return None
        likely = None if likely is None or extra[0] is None else likely + extra[0]
        high += extra[1]
    return base, likely, high


def assumed_latency(cfg: Config) -> tuple[float, float, str]:
    """(seconds before output, seconds per output token, how that was decided)."""
    if cfg.endpoint.base_url == "simulator":
        sim = cfg.endpoint.simulator
        first, per = float(sim.get("latency_ms", 0.0)) / 1000, float(sim.get("latency_per_output_token_ms", 0.0)) / 1000
        return first, per, f"the simulator's latency_ms={first * 1000:g} + {per * 1000:g} ms per output token"
    how = (f"{FIRST_TOKEN_S:g} s to the first token + {SECONDS_PER_OUTPUT_TOKEN * 1000:g} ms per output token "
           "(~33 tokens/s, typical of gpt-4-turbo)")
    return FIRST_TOKEN_S, SECONDS_PER_OUTPUT_TOKEN, how


def time_bounds(est: Estimate, cfg: Config) -> dict[str, tuple[float, float]]:
    """Seconds each limit alone needs, (with the likely or no output, with max output)."""
    n, lim = est.requests, cfg.limits
    out_low = est.requests * (est.output_likely_per_request or 0.0)
    bounds: dict[str, tuple[float, float]] = {}
    if lim.requests_per_minute:
        t = n / lim.requests_per_minute * 60
        bounds["requests/min"] = (t, t)
    if lim.tokens_per_minute:
        bounds["tokens/min"] = ((est.prompt_tokens + out_low) / lim.tokens_per_minute * 60,
                                (est.prompt_tokens + est.output_max) / lim.tokens_per_minute * 60)
    first, per, _ = assumed_latency(cfg)
    bounds["concurrency"] = ((n * first + out_low * per) / lim.max_concurrency,
                             (n * first + est.output_max * per) / lim.max_concurrency)
    return bounds


# -- report ----------------------------------------------------------------------------------------


def report(est: Estimate, cfg: Config) -> str:
    model = cfg.endpoint.model
    cap = max_output_tokens(model)
    lines = [f"Dry run of {cfg.source}: nothing was sent and nothing written.", ""]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<15} {text}")

    add("endpoint", f"{cfg.endpoint.base_url}  model {model} (context {context_window(model):,} tokens"
        + (f", output cap {cap:,})" if cap else ")"))
    add("input", f"{est.rows_total:,} rows from {cfg.input.path}")
    for note in est.notes:
        add("", note)
    add("already done", f"{est.rows_done_ok:,} answered, {est.rows_done_failed:,} recorded as failed (not re-asked)")
    if est.rows_cached:
        add("cached", f"{est.rows_cached:,} rows answered by the shared cache {cfg.cache.dir} (free)")
    add("would fail", f"{est.rows_failing:,} rows" + (": " + ", ".join(
        f"{r} {n:,}" for r, n in est.failing_by_reason.most_common()) if est.rows_failing else ""))
    for example in est.examples:
        add("", example)
    same = est.rows_to_send - est.distinct
    k = cfg.prompt.rows_per_request
    add("to send", f"{est.requests:,} requests for {est.rows_to_send:,} rows"
        + (f" (packs of up to {k} rows)" if k > 1 else "")
        + (f" ({same:,} of them {'repeats' if same == 1 else 'repeat'} an identical request, sent once)"
           if same else ""))
    add("input tokens", f"{est.prompt_tokens:,} ({est.token_method}; "
        f"{est.images:,} images ~{est.image_tokens:,} tokens by the tile rule)")
    likely = est.output_likely_per_request
    per_row = "max_tokens" in cfg.params.from_columns
    limit = ("max_tokens of each row" if per_row else f"max_tokens {cfg.params.max_tokens:,} a request"
             if cfg.params.max_tokens is not None else "no max_tokens: the model's output cap a request")
    add("output tokens", f"0 .. {est.output_max:,} ({limit})")
    add("", f"likely ~{round(likely * est.requests):,} ({likely:.1f} a request: {est.likely_basis})"
        if likely is not None else f"likely: {est.likely_basis}")
    from .savings import cache_lines

    _cost_lines(est, cfg, add)
    cache_lines(est, cfg, add)
    _time_lines(est, cfg, add)
    return "\n".join(lines) + "\n"


def _cost_lines(est: Estimate, cfg: Config, add: Any) -> None:
    costs = cost_range(est, cfg)
    model = cfg.endpoint.model
    if costs is None:
        add("cost", f"unknown: no price for {model}; add prices: {{{model}: {{input_per_m: .., output_per_m: ..}}}}")
        return
    low, likely, high = costs
    add("cost (USD)", f"${low:.4f} .. ${high:.4f}" + (f", likely ${likely:.4f}" if likely is not None else ""))
    for line in describe(est, cfg):
        add("", line)
    stages = [s.model for s in cfg.cascade or []] + ([cfg.quality.audit.model] if cfg.quality.audit else [])
    for name in dict.fromkeys([model, *(cfg.params.models or []), *stages]):
        price = find_price(cfg, name, batch=cfg.run.mode == "batch")
        if price is None:
            add("", f"{name}: no price known (the range leaves it out)")
            continue
        per_image = f", ${price.per_image:g} an image" if price.per_image else ""
        add("", f"{name}: ${price.input_per_m:g}/M in, ${price.output_per_m:g}/M out{per_image} ({price.source})")
    add("", "at run time the usage.cost an endpoint reports (OpenRouter) is charged instead")
    cap = cfg.budget.max_cost_usd
    if cap is None:
        return
    spent = spent_before(est, cfg)
    left = cap - spent
    verdict = ("fits even at max output" if high <= left else
               "may stop at the budget (exit 3) if answers run long" if low <= left else
               "will stop at the budget (exit 3) before the end; raise it with --set budget.max_cost_usd=...")
    add("budget", f"${cap:g} (${spent:.4f} spent by earlier runs of this job, ${left:.4f} left): {verdict}")


def _time_lines(est: Estimate, cfg: Config, add: Any) -> None:
    if cfg.run.mode == "batch":
        windows = len(cfg.cascade or [None])
        add("time", f"{duration(cfg.batch.poll_interval_s)} .. {duration(windows * 86400.0)}: the Batch API answers "
            "within its 24 h window (often minutes to hours)" + (
                f", one window per cascade stage ({windows}: a stage's rows go once the stage before has answered)"
                if windows > 1 else "") + "; its rate limits are the batch queue's, not limits.*")
        return
    bounds = time_bounds(est, cfg)
    low = max(lo for lo, _ in bounds.values())
    high = max(hi for _, hi in bounds.values())
    slowest = max(bounds, key=lambda k: bounds[k][1])
    add("time", f"{duration(low)} .. {duration(high)} without retries (slowest limit: {slowest})")
    lim = cfg.limits
    # Formatted for every limit, printed only for those that are set (a None limit has no bound line).
    detail = {"requests/min": f"{est.requests:,} requests at {lim.requests_per_minute or 0:g}/min",
              "tokens/min": f"input + output tokens at {lim.tokens_per_minute or 0:g}/min",
              "concurrency": f"{lim.max_concurrency} at a time x latency of {assumed_latency(cfg)[2]}"}
    for name, (lo, hi) in bounds.items():
        span = duration(lo) if lo == hi else f"{duration(lo)} .. {duration(hi)}"
        add("", f"{name:<13} {span}: {detail[name]}")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
