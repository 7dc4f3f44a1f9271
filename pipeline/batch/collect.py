"""A finished batch's output and error files -> records in the store, through THE classifier and THE
retry decision.

Each line is judged as the sync mode judges a reply: the line's `response` (status_code + body) is
handed to `send.classify.classify` as the reply it stands for; a line with only a top-level `error`
(`batch_expired`, `batch_cancelled`, ...) becomes the error reply its code names (5xx when unnamed, so
transient); a line neither file answered is a transient failure of its own ("missing"). What happens
next is `send.retry.decide`'s answer, with the request's tries so far counted from the ledger (every
file that carried it): retry -> the line goes into the next batch file (or to the sync engine when
`batch.retry_via: sync`); reshape -> the same, with the raised `max_tokens` (`structured.length_max_tokens`)
or under the next structured mode; fail -> a failure record; stop -> the run stops. Answers and failures
are built by send/outcome.py, as the sync mode builds them. Either file may hold any kind of line, in
any order; a line for a request this chunk does not carry is ignored (the server is untrusted).
Records are committed before the chunk counts as collected; re-reading the same files after a kill
writes the same records again. With `prompt.rows_per_request` > 1 a line is a pack: its record becomes
its rows' records (batch/packed.py) before anything is committed.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Config
from ..errors import BadContentError, PermanentError, RequestError, TransientError
from ..prepare.structured import StructuredPlan
from ..send.budget import Paid, Usage, max_cost, read_usage
from ..send.classify import NAMED_STATUS, classify
from ..send.outcome import answer_record, failure_record
from ..send.parse import parse_completion
from ..send.retry import Backoff, RetryPolicy, Tries, decide
from ..send.transport import Reply
from ..vocab import Record
from .files import max_tokens_of, request_payloads, result_lines
from .ledger import Chunk, Ledger

if TYPE_CHECKING:
    from .driver import Engine
    from .packed import BatchPacks

log = logging.getLogger("pipeline")


def batch_usage(body: dict[str, Any], cfg: Config, n_images: int, est: int) -> Usage:
    """What a batch answer cost: the provider's own `usage.cost` when it reports one (already the batch
    price), else the batch price (models/prices.py: the library's batch variant, else half the sync price)."""
    return read_usage(body, cfg, n_images, est_prompt=est, batch=True)


def worst_line_cost(cfg: Config, est: int, max_tokens: int | None, n_images: int) -> float:
    """The most one batch line can cost (the budget counts submitted lines at their worst case)."""
    return max_cost(est, max_tokens, cfg, n_images, batch=True)


@dataclass
class Collected:
    """What one chunk's files came to."""

    records: int = 0
    requeued: set[str] = field(default_factory=set)  # keys to put in the next batch file
    to_sync: set[str] = field(default_factory=set)  # keys left for the sync engine (batch.retry_via: sync)
    settled: set[str] = field(default_factory=set)  # keys recorded as failures by this run
    raised: dict[str, int] = field(default_factory=dict)  # requeued keys to send with this max_tokens
    alone: set[str] = field(default_factory=set)  # packs: rows to ask again, each in a pack of its own


class Collector:
    def __init__(self, cfg: Config, ledger: Ledger, engine: Engine, plan: StructuredPlan | None,
                 rng: random.Random | None = None, packs: BatchPacks | None = None,
                 lane_packs: dict[str, BatchPacks] | None = None) -> None:
        self.cfg, self.ledger, self.engine, self.plan, self.packs = cfg, ledger, engine, plan, packs
        self.lane_packs = lane_packs or {}  # a cascade's packing models: each splits its lines with its own
        self._packs = packs
        self.store = engine.store
        self.stats = engine.core.stats
        self.policy = RetryPolicy.of(cfg)
        self.backoff = Backoff(cfg.limits.backoff_base_s, cfg.limits.backoff_max_s, rng or random.Random())
        self._mode: str | None = None
        # The model of the chunk being collected: its prices and structured plan (a cascade's later stage).
        self._cfg, self._plan = cfg, plan
        self._chunk: Chunk | None = None
        self._max_tokens: dict[str, int | None] | None = None
        self._alone: list[str] = []  # rows to ask alone, recorded with the next outcomes

    def collect(self, chunk: Chunk, paths: list[str]) -> Collected:
        info = {key: (est, images) for key, est, images, _ in self.ledger.lines(chunk.chunk)}
        seen: set[str] = set()
        result = Collected()
        self._cfg, self._plan = self.engine.lane(chunk.model) if chunk.model is not None else (self.cfg, self.plan)
        self._packs = self.lane_packs.get(chunk.model, self.packs) if chunk.model is not None else self.packs
        self._mode = self._plan.mode if self._plan is not None else None  # what these lines were shaped for
        self._chunk, self._max_tokens, self._alone = chunk, None, []
        records: list[Record] = []
        outcomes: list[tuple[str, str]] = []
        for path in paths:
            ignored = 0
            for line in result_lines(path):
                key = line.get("custom_id") if isinstance(line, dict) else None
                if not isinstance(line, dict) or not isinstance(key, str) or key not in info:
                    ignored += 1  # not JSON, or for no request of this file: the server is untrusted
                    continue
                if key in seen:
                    continue  # answered in both files: the first (the output file's) counts
                seen.add(key)
                outcome, record = self._judge(key, line, *info[key], result)
                outcomes.append((key, outcome))
                if record is not None:
                    records.extend(self._rows(key, record, result))
                if len(outcomes) >= 1000:
                    self._commit(chunk, records, outcomes)
            if ignored:
                log.warning("batch %s: ignored %d lines of %s that answer no request of this file",
                            chunk.batch_id, ignored, os.path.basename(path))
        # Lines neither file answered (a failed or cancelled batch, a provider that dropped some): judged
        # before they are marked, so this attempt is not counted twice against the retry budget.
        for key in info.keys() - seen:
            self._observe(None)
            missing = TransientError("the batch ended without an answer for this request", code="missing")
            _, record = self._decide(key, missing, Paid(), None, result)
            if record is not None:
                records.extend(self._rows(key, record, result))
        self._commit(chunk, records, outcomes)
        self.ledger.mark_unanswered(chunk.chunk)
        if self._packs is not None:  # the sync engine is asked for rows, not packs
            result.to_sync = self._packs.row_keys(result.to_sync)
        return result

    def _rows(self, key: str, record: Record, result: Collected) -> list[Record]:
        """What to commit for a line's record: itself, or (a pack) its rows' records."""
        rows = self._packs.rows(key, record) if self._packs is not None else None
        if rows is None:
            return [record]
        records, failed, alone = rows
        result.settled |= failed
        result.alone |= alone
        self._alone.extend(alone)
        return records

    def _commit(self, chunk: Chunk, records: list[Record], outcomes: list[tuple[str, str]]) -> None:
        """Answers first, then the lines' outcomes: a kill in between re-reads the files, same records."""
        if records:
            self.store.put_now(records)
        if outcomes or self._alone:
            self.ledger.set_outcomes(chunk.chunk, outcomes, self._alone)
        self._alone = []
        records.clear()
        outcomes.clear()

    def _judge(self, key: str, line: dict[str, Any], est: int, images: int,
               result: Collected) -> tuple[str, Record | None]:
        """The line's outcome (for the ledger) and the record to store (None: not settled, ask again)."""
        reply = _as_reply(line)
        self._observe(reply.status)
        paid = Paid()
        body: dict[str, Any] | None = None
        try:
            body = classify(reply)
            usage = batch_usage(body, self._cfg, images, est)
            self._charge(usage, paid)
            parsed = self._parse(key, body, usage)
        except RequestError as exc:
            if body is None and exc.billed is not None:  # a failure the provider billed anyway
                self._charge(batch_usage(exc.billed, self._cfg, images, est), paid)
            # A 200 without choices is billed and answers nothing (send/classify.py): its body is kept too.
            raw = _raw(body) if body is not None else _raw(exc.billed) if exc.billed is not None else None
            return self._decide(key, exc, paid, raw, result)
        record = answer_record(key, parsed, paid, attempts=self.ledger.attempts(key)["sent"], status=reply.status,
                               raw=_raw(body))
        self.stats.answered()
        result.records += 1
        return "ok", record

    def _parse(self, key: str, body: dict[str, Any], usage: Usage) -> Any:
        try:
            return parse_completion(body, usage, self._plan, self.cfg.quality.confidence)
        except BadContentError:
            raise
        except Exception as exc:  # a parser bug must not lose a paid answer
            log.exception("could not parse the answer for %s", key)
            raise BadContentError(f"could not parse the answer: {type(exc).__name__}: {exc}", reason="parser") from exc

    def _decide(self, key: str, exc: RequestError, paid: Paid, raw: bytes | None,
                result: Collected) -> tuple[str, Record | None]:
        """THE retry decision (send/retry.py) for a failed line, with its tries counted by the ledger."""
        tries = self.ledger.attempts(key)
        counted = Tries(attempts=tries["sent"], transient=tries.get("transient", 0) + tries.get("missing", 0),
                        bad_content=tries.get("bad_content", 0))
        falls_back = isinstance(exc, PermanentError) and self._plan is not None and self._plan.fallback(
            exc.status, exc.message, exc.code, mode=self._mode)
        max_tokens = self._line_max_tokens(key) if _is_length(exc) else None
        decision = decide(exc, counted, self.policy, self.backoff, max_tokens=max_tokens, falls_back=falls_back)
        outcome = _outcome(exc)
        final = decision.action in ("fail", "stop")
        log.info("batch line %s failed: %s", key[:12], exc, extra={
            "event": "attempt_failed", "key": key, "attempt": counted.attempts, "status": exc.status,
            "error_class": exc.error_class, "retry_in_s": None if final else 0.0})
        if decision.action == "stop":
            assert decision.error is not None
            self.engine.stop(decision.error)
            return "fatal", None
        if decision.action == "fail":
            assert decision.state is not None
            self.stats.failed(decision.state)
            result.records += 1
            result.settled.add(key)
            return outcome, failure_record(key, decision.state, exc, paid, attempts=counted.attempts, raw=raw)
        if decision.retry_class is not None:
            self.stats.retried(decision.retry_class)
        if decision.action == "reshape" and decision.max_tokens is None:
            # The structured mode is not supported here: later files are rendered under the next mode.
            assert self._plan is not None
            self.store.set_meta("structured_mode", self._plan.mode)
            return outcome, None
        if decision.max_tokens is not None:
            result.raised[key] = decision.max_tokens
        if self.cfg.batch.retry_via == "sync" and outcome in ("transient", "missing"):
            result.to_sync.add(key)  # the sync engine sends it once the batches are collected
        else:
            result.requeued.add(key)
        return outcome, None

    def _line_max_tokens(self, key: str) -> int | None:
        """The max_tokens a line was sent with (read from the chunk's file once, when a length rule needs it)."""
        if self._max_tokens is None:
            assert self._chunk is not None
            keys = {k for k, *_ in self.ledger.lines(self._chunk.chunk)}
            self._max_tokens = {k: max_tokens_of(p) for k, p in request_payloads(self._chunk.path, keys)}
        return self._max_tokens.get(key)

    def _observe(self, status: int | None) -> None:
        """Each line is one attempt in the run's tally (metrics), as each chat request is."""
        if self.engine.observe is not None:
            self.engine.observe(status, None if status is not None else "missing")

    def _charge(self, usage: Usage, paid: Paid) -> None:
        """Count a billed line (an answer, or a failure that carried usage) as spend."""
        self.engine.core.charge(usage.cost_usd)
        self.stats.paid(usage.prompt_tokens, usage.completion_tokens, usage.cost_usd)
        self.stats.cached(usage.cached_tokens, usage.cache_write_tokens, usage.saved_usd)
        paid.add(usage)


def _is_length(exc: RequestError) -> bool:
    return isinstance(exc, BadContentError) and exc.reason == "length"


def _outcome(exc: RequestError) -> str:
    """The ledger's name for how a line ended (its tries are counted by these)."""
    if exc.code == "missing":
        return "missing"
    return {"transient": "transient", "bad_content": "bad_content", "run_fatal": "fatal"}.get(exc.error_class,
                                                                                               "permanent")


def _as_reply(line: dict[str, Any]) -> Reply:
    """The reply a result line stands for, for the classifier."""
    resp = line.get("response")
    resp = resp if isinstance(resp, dict) else {}
    status = resp.get("status_code")
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        body = resp.get("body")
        raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
        return Reply(status, {}, raw, 0.0)
    err = line.get("error")
    if not isinstance(err, dict):
        err = {"message": "the result line has neither a response nor an error", "code": "malformed"}
    code = err.get("code")
    status = NAMED_STATUS.get(code, 500) if isinstance(code, str) else 500
    if status == 200 or status < 400:
        status = 500
    return Reply(status, {}, orjson.dumps({"error": err}), 0.0)


def _raw(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)
