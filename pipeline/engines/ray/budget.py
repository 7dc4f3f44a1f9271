"""One budget for a whole Ray job, held by the job's limiter actor and kept with its journal.

`budget.max_cost_usd` caps the job, not a worker: every worker's request reserves its worst case at the
actor (`JobBudget.reserve`) before it is sent and settles it with what the answer cost, so across all
workers spent + reserved never exceeds the cap, as in the local engine (send/budget.py). The overshoot
is bounded by what is in flight across all workers, and only when an answer costs more than its worst case.

A worker that dies cannot settle: its reservations may have been paid. They are counted as spent (at
their worst case) when its restarted incarnation says hello (Ray keeps the actor id), or when it has
not polled the actor for DEAD_S; should it come back after all, each late settle corrects the figure.

Persisted: before the actor grants beyond what `_journal/_budget.json` records, it writes a new
ceiling (spent + reserved + a chunk of 2% of the cap), so an actor that Ray restarts, or a driver that
runs after one that died, starts from at least what was spent; at a clean end the driver writes the
exact figure. A crash therefore costs at most one chunk of budget (unspent), never an overshoot.

The worst case is the table's, times the endpoint's markup (send/budget.py): the actor learns it from
every worker's answers (usage.cost against the table's price, sent with each settle, or every LEARN_S
when there is no cap), reserves at it for all workers, and keeps its sums in the same file (`markup`,
written when it moves by more than 1% and at the end), so a resumed run reserves at the endpoint's rate
from its first request.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import BudgetExceeded, Stopped
from ...read import storage
from ...send.budget import Budget

BUDGET_FILE = "_budget.json"      # under <output.dir>/_journal/
DEAD_S = 5.0                      # a worker silent this long (it polls every 0.25 s) is taken for dead
CHUNK = 0.02                      # share of the cap persisted ahead of what is granted
WAIT_S = 0.5                      # how long one reserve call waits at the actor before the worker asks again
LEARN_S = 1.0                     # without a cap, how often a worker tells the actor what the endpoint billed


def budget_uri(root: str) -> str:
    return storage.join(root, "_journal", BUDGET_FILE)


def read_budget(root: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """`_budget.json` as written ({} when there is none, or it cannot be read)."""
    try:
        value = orjson.loads(storage.read_bytes(budget_uri(root), options))
    except (FileNotFoundError, OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_spent(root: str, options: dict[str, Any] | None) -> float | None:
    """What the job's budget has counted as spent so far (None: nothing recorded yet)."""
    value = read_budget(root, options).get("spent")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def spent_so_far(root: str, options: dict[str, Any] | None, summarised: float) -> float:
    """What a new run's budget starts from: the larger of what the budget file records and what the last
    summary counted (`summarised`, the job's cost_usd). Both only ever undercount: the file may be older
    than a run that had no cap, the summary is missing when a driver died (the file's ceiling covers it)."""
    return max(read_spent(root, options) or 0.0, summarised)


def write_spent(root: str, options: dict[str, Any] | None, spent: float, *, exact: bool,
                learned: str | None = None) -> None:
    """`learned`: the endpoint's markup sums (send.budget.Budget.learned), kept for the next run."""
    body: dict[str, Any] = {"spent": spent, "exact": exact, "at": time.time()}
    if learned is not None:
        body["markup"] = learned
    storage.write_bytes(budget_uri(root), orjson.dumps(body), options, root=root)


@dataclass
class _Worker:
    reserved: float = 0.0
    count: int = 0
    seen: float = 0.0
    lost: float = 0.0        # worst cases counted as spent when it was taken for dead


class JobBudget:
    """The actor's side: spent and reserved for the whole job, per worker (to find dead ones)."""

    def __init__(self, cap: float, spent: float, *, clock: Callable[[], float] = time.time,
                 persist: Callable[[float, str], None] | None = None, dead_after_s: float = DEAD_S,
                 learned: str | None = None) -> None:
        self.cap, self.spent, self.clock = cap, spent, clock
        self.persist, self.dead_after_s = persist, dead_after_s
        self.ceiling = spent  # what the persisted file holds (at least)
        self.workers: dict[str, _Worker] = {}
        self.lost = 0.0
        self._changed = asyncio.Event()
        # The endpoint's markup over the price table, learned from every worker's answers (the local
        # budget's arithmetic; only its markup is used here), starting from what earlier runs learned.
        self.rate = Budget(None)
        self.rate.seed(learned)

    @property
    def markup(self) -> float:
        return self.rate.markup

    async def learn(self, reported: float, table: float) -> None:
        """What the endpoint charged for answers the table prices at `table`; a markup that moved is
        persisted at once, so a resumed run reserves at it from its first request."""
        if self.rate.learn(reported, table) and self.persist is not None:
            await asyncio.to_thread(self.persist, self.ceiling, self.rate.learned())

    @property
    def reserved(self) -> float:
        return sum(w.reserved for w in self.workers.values())

    def hello(self, worker: str, incarnation: str) -> None:
        """A worker (re)starts: an earlier incarnation of the same actor died with its reservations."""
        old = self.workers.get(worker)
        if old is not None and old.count:
            self._bury(old)
        self.workers[worker] = _Worker(seen=self.clock())

    def seen(self, worker: str) -> None:
        w = self.workers.get(worker)
        if w is not None:
            w.seen = self.clock()

    def _bury(self, w: _Worker) -> None:
        self.spent += w.reserved
        self.lost += w.reserved
        w.lost += w.reserved
        w.reserved, w.count = 0.0, 0
        self._wake()

    def _expire(self) -> None:
        now = self.clock()
        for w in self.workers.values():
            if w.count and now - w.seen > self.dead_after_s:
                self._bury(w)

    def live_in_flight(self) -> int:
        return sum(w.count for w in self.workers.values())

    async def reserve(self, worker: str, amount: float, wait_s: float = WAIT_S) -> str:
        """"ok" (held), "wait" (ask again: others in flight may settle) or "exceeded" (nothing in flight
        and it does not fit)."""
        w = self.workers.setdefault(worker, _Worker(seen=self.clock()))
        w.seen = self.clock()
        deadline = self.clock() + wait_s
        while True:
            self._expire()
            if self.spent + self.reserved + amount <= self.cap:
                break
            if not self.live_in_flight():
                return "exceeded"
            left = deadline - self.clock()
            if left <= 0:
                return "wait"
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.25))
            except TimeoutError:
                pass
        w.reserved += amount
        w.count += 1
        if self.persist is not None and self.spent + self.reserved > self.ceiling:
            self.ceiling = self.spent + self.reserved + CHUNK * self.cap
            await asyncio.to_thread(self.persist, self.ceiling, self.rate.learned())
        return "ok"

    def settle(self, worker: str, amount: float, charged: float) -> None:
        w = self.workers.setdefault(worker, _Worker())
        w.seen = self.clock()
        if w.lost >= amount - 1e-12 and w.count == 0:  # taken for dead, yet it answered: correct the figure
            w.lost -= amount
            self.lost -= amount
            self.spent += charged - amount
        else:
            w.reserved = w.reserved - amount if w.count > 1 else 0.0
            w.count = max(0, w.count - 1)
            self.spent += charged
        self._wake()

    def charge(self, worker: str, cost: float) -> None:
        """Paid outside a reservation (no cap was in force for it): counted all the same."""
        self.spent += cost

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def state(self) -> dict[str, Any]:
        return {"cap": self.cap, "spent": self.spent, "reserved": self.reserved, "lost": self.lost,
                "in_flight": self.live_in_flight(), "markup": self.markup, "learned": self.rate.learned()}


class RayBudget:
    """The worker's side, with the interface of send.budget.Budget that the dispatcher uses. The actor
    prices each reservation at the job's learned markup; what the endpoint charged over the table goes
    back with each settle."""

    def __init__(self, cap: float | None, actor: Any, worker: str | None = None) -> None:
        self.cap, self.actor = cap, actor
        self.worker = worker or uuid.uuid4().hex[:12]
        self._closed = False
        self._charged = 0.0  # charged since the last settle: sent with it, so spent never lags a release
        self._billed = (0.0, 0.0)  # (usage.cost, the table's price) of answers since the last settle
        self._told_at = 0.0  # without a cap: when the actor last heard what was billed (at most every LEARN_S)

    async def reserve(self, amount: float) -> float:
        """`amount`: the table's worst case; returns what the actor holds (times the markup)."""
        if self.cap is None:
            return 0.0
        while True:
            if self._closed:
                raise Stopped()
            verdict, held = await self.actor.reserve.remote(self.worker, amount)
            if verdict == "ok":
                if self._closed:  # stopped while it was granted: give it back
                    self.release(held)
                    raise Stopped()
                return float(held)
            if verdict == "exceeded":
                state = await self.actor.budget_state.remote()
                raise BudgetExceeded(
                    f"budget reached: the job spent ${state['spent']:.4f} (all workers, earlier runs included) "
                    f"and the next request may cost up to ${held:.4f}, over budget.max_cost_usd=${self.cap:g}")

    def release(self, amount: float) -> None:
        if self.cap is None:  # nothing reserved; the markup is still learned, for a later run with a cap
            if self._billed[1] > 0 and time.monotonic() - self._told_at >= LEARN_S:
                billed, self._billed, self._told_at = self._billed, (0.0, 0.0), time.monotonic()
                self.actor.learn_markup.remote(*billed)
            return
        charged, self._charged = self._charged, 0.0
        billed, self._billed = self._billed, (0.0, 0.0)
        self.actor.settle.remote(self.worker, amount, charged, billed if billed[1] > 0 else None)

    def charge(self, cost: float) -> None:
        if self.cap is None:
            return
        self._charged += max(0.0, cost)

    def learn(self, reported: float, table: float) -> bool:
        """Kept until the next settle (without a cap: sent every LEARN_S); the actor learns and persists the
        job's markup (so never True: the dispatcher has nothing to note in the journal)."""
        if table > 0 and reported >= 0:
            self._billed = (self._billed[0] + reported, self._billed[1] + table)
        return False

    def close(self) -> None:
        self._closed = True
