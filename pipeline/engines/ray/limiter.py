"""Limits that hold across Ray workers: one limiter actor, leased in chunks.

The actor (`LimiterActor`, named per job, `num_cpus=0`) owns the job's requests/min and tokens/min
buckets (send.limits.Bucket: the same smooth-minute arithmetic as the local engine) and the global
pause. A worker's `RayLimits` is the local `Limits` with its two buckets replaced by `LeasedBucket`s:
each holds a local balance and, when it runs dry, leases about `LEASE_S` of the job's rate from the
actor in one call, so the actor is asked a few times a second per worker, not once per request
(one call per request tops out near 600-900/s on 2 cores: field notes §2).

- Concurrency: `limits.max_concurrency` is split evenly across workers (their sum never exceeds it);
  AIMD halving on header-less 429s stays per worker.
- 429 with a wait: the worker pauses itself and tells the actor; every other worker learns the pause
  at its next lease or poll (`POLL_S`), and the actor's requests bucket restarts empty after it.
- Rate-limit headers: a learned limit lowers the actor's bucket (for all workers); `remaining/reset`
  pacing is divided by the number of workers, since the headers describe the whole key's budget.
- Token estimates settle locally against the real usage. A worker that ends holds at most one lease
  (about LEASE_S of the job's rate) unspent: the job runs that much under its limit, never over.
- The budget: the actor also holds the job's one budget (budget.JobBudget), reserved per request.
- Liveness: every worker polls the actor (POLL_S) under its id; the driver's status reads how many did
  lately, and a driver that lost its lease halts every worker through the same poll.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ...config import LimitsConfig
from ...send.budget import Budget
from ...send.limits import HEADROOM, Bucket, Limits
from .budget import DEAD_S, JobBudget, write_spent

LEASE_S = 0.1   # seconds of the job's rate one lease asks for
POLL_S = 0.25   # how often an idle worker asks whether another worker was told to pause


class LimiterActor:
    """Runs inside Ray as an async actor: every method call is a coroutine on the actor's loop."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float, itpm: float | None = None,
                 otpm: float | None = None, clock: Callable[[], float] = time.time,
                 budget: tuple[float | None, float, str, dict[str, Any] | None] | None = None) -> None:
        self.clock = clock  # wall clock: workers run on other machines and loops (tests: a virtual one)
        self.buckets: dict[str, Bucket | None] = {
            "requests": Bucket(rpm, burst_s) if rpm else None,
            "tokens": Bucket(tpm, burst_s) if tpm else None,
            "input_tokens": Bucket(itpm, burst_s) if itpm else None,
            "output_tokens": Bucket(otpm, burst_s) if otpm else None,
        }
        self.burst_s = burst_s
        self.resume_at = 0.0
        self.granted = dict.fromkeys(self.buckets, 0.0)
        self.leases = 0
        self.pauses = 0
        self.workers: dict[int, str] = {}  # pid -> node: which processes hold leases (ops, kill tests)
        self.seen: dict[str, float] = {}   # worker id -> last poll
        self.halted: str | None = None
        self.budget: JobBudget | None = None
        self.rate = Budget(None)  # without a cap: the endpoint's markup, learned for a later run with one
        if budget is not None:
            cap, spent, root, options = budget
            from .budget import read_budget, read_spent
            stored = read_budget(root, options).get("markup")
            learned = stored if isinstance(stored, str) else None
            self.rate.seed(learned)
            if cap is not None:
                # Ray restarts this actor with the same arguments: continue from what was persisted since,
                # and reserve at the markup earlier runs (or this actor's earlier incarnation) learned.
                spent = max(spent, read_spent(root, options) or 0.0)
                self.budget = JobBudget(cap, spent, clock=clock, learned=learned,
                                        persist=lambda ceiling, learned: write_spent(root, options, ceiling,
                                                                                     exact=False, learned=learned))

    def hello(self, pid: int, node: str, worker: str = "") -> None:
        self.workers[pid] = node
        if worker:
            self.seen[worker] = self.clock()
            if self.budget is not None:
                self.budget.hello(worker, str(pid))

    def poll(self, worker: str) -> dict[str, Any]:
        """A worker's heartbeat: the shared pause, and whether the driver halted the job."""
        self.seen[worker] = self.clock()
        if self.budget is not None:
            self.budget.seen(worker)
        return {"resume_at": self.resume_at, "halted": self.halted}

    def halt(self, message: str) -> None:
        self.halted = message

    async def reserve(self, worker: str, amount: float) -> tuple[str, float]:
        """(verdict, the amount held): `amount` is the table's worst case, held at the job's markup."""
        assert self.budget is not None
        self.seen[worker] = self.clock()
        held = amount * self.budget.markup
        return await self.budget.reserve(worker, held), held

    async def settle(self, worker: str, amount: float, charged: float,
                     billed: tuple[float, float] | None = None) -> None:
        """A reservation given back with what was charged since; `billed`: (usage.cost, table price) of
        the answers the endpoint costed itself, for the markup."""
        if self.budget is not None:
            self.budget.settle(worker, amount, charged)
            if billed is not None:
                await self.budget.learn(*billed)

    async def learn_markup(self, reported: float, table: float) -> None:
        """What the endpoint billed over the table, from a worker that reserves nothing (no cap)."""
        if self.budget is not None:
            await self.budget.learn(reported, table)
        else:
            self.rate.learn(reported, table)

    def budget_state(self) -> dict[str, Any]:
        """The budget's figures (with a cap), and the markup learned so far (`learned`; `markup_known`:
        some answer was costed by the endpoint, in this job)."""
        if self.budget is not None:
            return {**self.budget.state(), "markup_known": self.budget.rate.billed_table > 0}
        return {"learned": self.rate.learned(), "markup": self.rate.markup, "markup_known": self.rate.billed_table > 0}

    async def lease(self, kind: str, amount: float) -> tuple[float, float]:
        """(granted, resume_at): waits for the pause and the bucket; an unlimited kind grants at once."""
        while (delay := self.resume_at - self.clock()) > 0:
            await asyncio.sleep(delay)
        bucket = self.buckets.get(kind)
        if bucket is not None:
            await bucket.take(min(amount, bucket.per_minute / 2))
            amount = min(amount, bucket.per_minute / 2)
        self.granted[kind] += amount
        self.leases += 1
        return amount, self.resume_at

    def pause_until(self, epoch: float) -> float:
        if epoch > self.resume_at:
            self.resume_at = epoch
            self.pauses += 1
            requests = self.buckets["requests"]
            if requests is not None:
                requests.drain()  # back at the steady rate after the pause, not as a burst
        return self.resume_at

    def learn(self, kind: str, limit: float) -> None:
        bucket = self.buckets.get(kind)
        target = limit * HEADROOM
        if bucket is None:
            self.buckets[kind] = Bucket(target, self.burst_s)
        elif target < bucket.per_minute:
            bucket.set_rate(target)

    def state(self) -> dict[str, Any]:
        return {"resume_at": self.resume_at, "leases": self.leases, "pauses": self.pauses,
                "granted": dict(self.granted), "workers": dict(self.workers), "halted": self.halted,
                "alive": sum(1 for t in self.seen.values() if self.clock() - t < DEAD_S),
                "per_minute": {k: (b.per_minute if b else None) for k, b in self.buckets.items()}}


class LeasedBucket:
    """What Limits and Slot use of a Bucket, backed by leases from the limiter actor."""

    def __init__(self, owner: RayLimits, kind: str, per_minute: float) -> None:
        self.owner, self.kind, self.per_minute = owner, kind, per_minute
        self.balance = 0.0
        self._lock = asyncio.Lock()
        self._open = False

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0 / self.owner.workers

    async def acquire(self, amount: float = 1.0) -> None:
        await self.take(amount)

    async def take(self, amount: float) -> None:
        while not self._open and self.balance < amount:
            async with self._lock:  # one lease in flight per bucket; the others wait for its chunk
                if self._open or self.balance >= amount:
                    break
                want = max(amount - self.balance, self.rate_per_s * LEASE_S, 1.0)
                granted, resume_at = await self.owner.actor.lease.remote(self.kind, want)
                self.balance += granted
                self.owner.saw(resume_at)
        self.balance -= amount

    def adjust(self, delta: float) -> None:
        self.balance -= delta  # used more than estimated: the next lease asks for it

    def set_rate(self, per_minute: float) -> None:
        self.per_minute = per_minute

    def open(self) -> None:
        self._open = True

    def drain(self) -> None:
        self.balance = min(self.balance, 0.0)


class RayLimits(Limits):
    """The local Limits with leased buckets and a pause shared through the actor."""

    def __init__(self, cfg: LimitsConfig, actor: Any, workers: int, clock: Callable[[], float] = time.time,
                 worker: str = "") -> None:
        share = cfg.model_copy(update={"max_concurrency": max(1, cfg.max_concurrency // workers)})
        super().__init__(share)
        self.actor, self.workers, self.clock = actor, workers, clock
        rpm, tpm = cfg.requests_per_minute, cfg.tokens_per_minute
        self.requests = LeasedBucket(self, "requests", rpm) if rpm else None  # type: ignore[assignment]
        self.tokens = LeasedBucket(self, "tokens", tpm) if tpm else None  # type: ignore[assignment]
        itpm, otpm = cfg.input_tokens_per_minute, cfg.output_tokens_per_minute
        self.input_tokens = LeasedBucket(self, "input_tokens", itpm) if itpm else None  # type: ignore[assignment]
        self.output_tokens = LeasedBucket(self, "output_tokens", otpm) if otpm else None  # type: ignore[assignment]
        self._poller: asyncio.Task[None] | None = None
        self.worker = worker
        self.on_halt: Callable[[str], None] | None = None

    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while not self.stopped:
            try:
                state = await self.actor.poll.remote(self.worker)
                self.saw(state["resume_at"])
                if state["halted"] and self.on_halt is not None:
                    self.on_halt(state["halted"])
            except Exception:  # the actor restarting: the next lease will wait for it
                pass
            await asyncio.sleep(POLL_S)

    def saw(self, resume_at: float) -> None:
        """Another worker's pause, as the actor reported it."""
        wait = resume_at - self.clock()
        if wait > 0:
            super().pause(wait)

    def pause(self, seconds: float) -> None:
        super().pause(seconds)
        if seconds > 0:
            self.actor.pause_until.remote(self.clock() + seconds)

    def _learn(self, kind: str, limit: float, source: str) -> None:
        self.learned[kind] = limit
        self.actor.learn.remote(kind, limit)
        bucket = self.requests if kind == "requests" else self.tokens
        if bucket is None:
            leased = LeasedBucket(self, kind, limit * HEADROOM)
            if kind == "requests":
                self.requests = leased  # type: ignore[assignment]
            else:
                self.tokens = leased  # type: ignore[assignment]
        elif limit * HEADROOM < bucket.per_minute:
            bucket.set_rate(limit * HEADROOM)

    def _pace_from(self, kind: str, remaining: float, reset_s: float, limit: float | None) -> None:
        # The headers count the whole key's budget; this worker is one of `workers` spending it.
        share = limit / self.workers if limit else limit
        super()._pace_from(kind, remaining / self.workers, reset_s, share)
