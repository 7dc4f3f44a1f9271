"""A finished batch's output and error files -> records in the store, through THE classifier.

Each line is judged as the sync mode judges a reply: the line's `response` (status_code + body) is
handed to `send.classify.classify` as the reply it stands for; a line with only a top-level `error`
(`batch_expired`, `batch_cancelled`, ...) becomes the error reply its code names (5xx when unnamed, so
transient). Then the same outcome rules as the sync retry loop: a permanent failure is recorded; a
transient one (429, 5xx, expired, a line neither file answered) goes to the next batch file, or to the
sync engine when `batch.retry_via: sync`, until `limits.max_retries`; unusable content (parsed and
validated by write/parse.py, as in sync mode) uses the bad-content budget; a run-fatal line (401, 402,
quota) stops the run. Either file may hold any kind of line, in any order; a line for a request this
chunk does not carry is ignored (the server is untrusted). Records are committed before the chunk
counts as collected; re-reading the same files after a kill writes the same records again.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Config
from ..errors import (
    BadContentError,
    FatalReply,
    PermanentError,
    RequestError,
    RunFatalError,
    TransientError,
)
from ..prepare.structured import StructuredPlan
from ..send.budget import Paid, Usage, max_cost, read_usage
from ..send.classify import NAMED_STATUS, classify
from ..send.parse import parse_completion
from ..send.transport import Reply
from ..vocab import Record
from .files import result_lines
from .ledger import Chunk, Ledger

if TYPE_CHECKING:
    from .driver import Engine

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


class Collector:
    def __init__(self, cfg: Config, ledger: Ledger, engine: Engine, plan: StructuredPlan | None) -> None:
        self.cfg, self.ledger, self.engine, self.plan = cfg, ledger, engine, plan
        self.store = engine.store
        self.stats = engine.core.stats
        self._mode: str | None = None

    def collect(self, chunk: Chunk, paths: list[str]) -> Collected:
        info = {key: (est, images) for key, est, images, _ in self.ledger.lines(chunk.chunk)}
        seen: set[str] = set()
        result = Collected()
        self._mode = self.plan.mode if self.plan is not None else None  # what these lines were shaped for
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
                outcome, record = self._judge(key, line, *info[key])
                self._count(key, outcome, record, result)
                outcomes.append((key, outcome))
                if record is not None:
                    records.append(record)
                if len(outcomes) >= 1000:
                    self._commit(chunk, records, outcomes)
            if ignored:
                log.warning("batch %s: ignored %d lines of %s that answer no request of this file",
                            chunk.batch_id, ignored, os.path.basename(path))
        # Lines neither file answered (a failed or cancelled batch, a provider that dropped some): judged
        # before they are marked, so this attempt is not counted twice against the retry budget.
        for key in info.keys() - seen:
            record = self._give_up(key, "missing", info[key])
            self._count(key, "missing", record, result)
            if record is not None:
                records.append(record)
        self._commit(chunk, records, outcomes)
        self.ledger.mark_unanswered(chunk.chunk)
        return result

    def _commit(self, chunk: Chunk, records: list[Record], outcomes: list[tuple[str, str]]) -> None:
        """Answers first, then the lines' outcomes: a kill in between re-reads the files, same records."""
        if records:
            self.store.put_now(records)
        if outcomes:
            self.ledger.set_outcomes(chunk.chunk, outcomes)
        records.clear()
        outcomes.clear()

    def _count(self, key: str, outcome: str, record: Record | None, result: Collected) -> None:
        if record is not None:
            result.records += 1
            if record.state == "ok":
                self.stats.answered()
            else:
                self.stats.failed(record.state)
                result.settled.add(key)
        elif outcome in ("transient", "missing", "bad_content"):
            self.stats.retried("bad_content" if outcome == "bad_content" else "transient")
            if self.cfg.batch.retry_via == "sync" and outcome != "bad_content":
                result.to_sync.add(key)
            else:
                result.requeued.add(key)

    def _judge(self, key: str, line: dict[str, Any], est: int, images: int) -> tuple[str, Record | None]:
        """The line's outcome class and the record to store (None: not settled, ask again)."""
        try:
            body = classify(_as_reply(line))
        except (FatalReply, RunFatalError) as exc:
            self._failed(key, exc, None)
            self.engine.stop(exc)
            return "fatal", None
        except TransientError as exc:
            paid = self._charge(exc.billed, est, images)
            return "transient", self._failed(key, exc, self._give_up(key, "transient", (est, images), exc, paid))
        except PermanentError as exc:
            paid = self._charge(exc.billed, est, images)
            if self.plan is not None and self.plan.fallback(exc.status, exc.message, exc.code, mode=self._mode):
                # The structured mode is not supported here: later files are rendered under the next mode.
                self.store.set_meta("structured_mode", self.plan.mode)
                return "permanent", None
            return "permanent", self._failed(key, exc, self._record(key, "permanent", exc, paid))
        except BadContentError as exc:  # a 200 without choices: billed, answered nothing (send/classify.py)
            paid = self._charge(exc.billed, est, images)
            record = self._give_up(key, "bad_content", (est, images), exc, paid, raw=_raw(exc.billed or line))
            return "bad_content", self._failed(key, exc, record)
        usage = batch_usage(body, self.cfg, images, est)
        paid = self._charge(body, est, images, usage)
        try:
            parsed = parse_completion(body, usage, self.plan)
        except BadContentError as exc:
            record = self._give_up(key, "bad_content", (est, images), exc, paid, raw=_raw(body))
            return "bad_content", self._failed(key, exc, record)
        except Exception as exc:  # a parser bug must not lose a paid answer
            log.exception("could not parse the answer for %s", key)
            err = BadContentError(f"could not parse the answer: {type(exc).__name__}: {exc}", reason="parser")
            return "bad_content", self._record(key, "bad_content", err, paid, raw=_raw(body))
        record = Record(
            key=key, state="ok", attempts=self.ledger.attempts(key)["sent"], status=200, content=parsed.content,
            output_json=None if parsed.output is None else orjson.dumps(parsed.output).decode(),
            finish_reason=parsed.finish_reason, model=parsed.model, provider=parsed.provider,
            prompt_tokens=paid.prompt_tokens, completion_tokens=paid.completion_tokens, cost_usd=paid.cost_usd,
            cached_tokens=paid.cached_tokens, cache_write_tokens=paid.cache_write_tokens,
            tool_calls_json=parsed.tool_calls_json, logprobs_json=parsed.logprobs_json, raw=_raw(body))
        return "ok", record

    def _failed(self, key: str, exc: RequestError | RunFatalError, record: Record | None) -> Record | None:
        """The attempt_failed event (pipeline.log) for a line; `record` None: it goes again."""
        final = record is not None or isinstance(exc, (FatalReply, RunFatalError))
        log.info("batch line %s failed: %s", key[:12], exc, extra={
            "event": "attempt_failed", "key": key, "attempt": self.ledger.attempts(key)["sent"],
            "status": getattr(exc, "status", None), "error_class": getattr(exc, "error_class", "run_fatal"),
            "retry_in_s": None if final else 0.0})
        return record

    def _give_up(self, key: str, outcome: str, info: tuple[int, int], exc: RequestError | None = None,
                 paid: Paid | None = None, raw: bytes | None = None) -> Record | None:
        """A failure a later attempt may cure: None (ask again) while the budget for its class lasts."""
        tries = self.ledger.attempts(key)
        if outcome == "bad_content":
            budget = self.cfg.structured.bad_content_retries if self.cfg.structured else 1
            if isinstance(exc, BadContentError) and exc.reason == "length":
                budget = 0  # the same max_tokens would be paid for the same truncation again
            used = tries.get("bad_content", 0)
            state = "bad_content"
        else:
            if self.cfg.batch.retry_via == "sync":
                return None  # the sync engine sends it once the batches are collected
            budget = self.cfg.limits.max_retries
            used = tries.get("transient", 0) + tries.get("missing", 0)
            state = "transient"
        if used < budget:
            return None
        exc = exc or TransientError("the batch ended without an answer for this request", code="missing")
        return self._record(key, state, exc, paid or Paid(), raw=raw)

    def _record(self, key: str, state: str, exc: RequestError, paid: Paid,
                raw: bytes | None = None) -> Record:
        reason = getattr(exc, "reason", None)
        message = (exc.message if not reason else f"{reason}: {exc.message}")[:1000]
        return Record(key=key, state=state, attempts=self.ledger.attempts(key)["sent"], status=exc.status,
                      error_class=exc.error_class, message=message, content=exc.content,
                      prompt_tokens=paid.prompt_tokens, completion_tokens=paid.completion_tokens,
                      cost_usd=paid.cost_usd, cached_tokens=paid.cached_tokens,
                      cache_write_tokens=paid.cache_write_tokens, raw=raw)

    def _charge(self, body: dict[str, Any] | None, est: int, images: int,
                usage: Usage | None = None) -> Paid:
        """Count a billed line (an answer, or a failure that carried usage) as spend."""
        paid = Paid()
        if body is None:
            return paid
        usage = usage or batch_usage(body, self.cfg, images, est)
        self.engine.core.charge(usage.cost_usd)
        self.stats.paid(usage.prompt_tokens, usage.completion_tokens, usage.cost_usd)
        self.stats.cached(usage.cached_tokens, usage.cache_write_tokens, usage.saved_usd)
        paid.add(usage)
        return paid


def _as_reply(line: dict[str, Any]) -> Reply:
    """The reply a result line stands for, for the classifier."""
    resp = line.get("response")
    if isinstance(resp, dict) and isinstance(resp.get("status_code"), int):
        body = resp.get("body")
        raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
        return Reply(resp["status_code"], {}, raw, 0.0)
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
