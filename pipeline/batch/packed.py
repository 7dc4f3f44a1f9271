"""run.mode: batch with `prompt.rows_per_request` > 1: every Batch API line carries one pack.

Writing: the rows the store cannot answer are packed by the sync mode's own packer (core/packing.py's
PackSender and its Packer), in the same order, so a pack has the same body and request key in both modes
and its shared prefix stays cacheable. Each pack's rows (their keys in pack order, each row's share of
the prompt, the shared prefix) go into the ledger before its line is written: the pack's key is fixed by
its rows, so a line carried into a later file (a retry) keeps them, and a later run can split an answer
without the pack in memory.

Collecting: a pack line is judged as any line (batch/collect.py: the one classifier, the one retry
decision; its transient failures are retried as the whole pack). Its record, answer or final failure, is
turned into its rows' records by the sync mode's `PackSender.settle` (split by id, tokens and cost
apportioned, core/packing.py and prepare/packs.py), all committed in one transaction with the lines
around it; the pack's own record is never stored. Rows the answer leaves without a usable answer (and
the rows of a pack of several that failed as a whole) are recorded as `alone` with the line's outcome,
in the same transaction, and the next round renders them again and sends each in a pack of its own; a
row alone that keeps answering badly ends as `bad_content` after `structured.bad_content_retries`
(counted in the ledger, so runs with --no-wait cannot ask it forever).
"""
from __future__ import annotations

from dataclasses import replace

from ..core.packing import PackSender
from ..prepare.packs import Pack
from ..vocab import Record, Request
from .ledger import Ledger


class BatchPacks:
    def __init__(self, sender: PackSender, ledger: Ledger) -> None:
        self.sender, self.ledger = sender, ledger

    def spoken_for(self, rows: list[str]) -> set[str]:
        """Those of `rows` that a pack line in flight already carries."""
        return self.ledger.spoken_rows(rows)

    def carriers(self, rows: list[str]) -> dict[str, int]:
        """{row: the live chunk whose pack line carries it} for those of `rows` a pack line in flight carries."""
        return self.ledger.row_carriers(rows)

    def lines(self, rows: list[Request]) -> list[Request]:
        """The pack requests for `rows`, as the sync mode packs them (rows to ask alone: each in its own),
        with their rows recorded in the ledger first."""
        alone = self.ledger.alone([r.key for r in rows])
        packer = self.sender.packer
        packs = packer.packs([r for r in rows if r.key not in alone])
        packs += packer.packs([r for r in rows if r.key in alone], 1)
        out: list[Request] = []
        for pack in packs:
            assert pack.request is not None  # built by the packer
            out.append(pack.request)
        self.ledger.add_packs([(req.key, [(r.key, r.chars) for r in pack.rows], pack.shared_chars)
                               for req, pack in zip(out, packs)])
        return out

    def rows(self, key: str, record: Record) -> tuple[list[Record], set[str], set[str]] | None:
        """A pack line's record (answer or final failure) as its rows' records to commit together, the rows
        that failed for good (not asked again by this run) and the rows to ask again alone; None when the
        line is no pack."""
        found = self.ledger.pack(key)
        if found is None:
            return None
        pack = Pack.of_ledger(*found)
        tries = self.ledger.attempts(key)
        answered = tries.get("ok", 0)  # earlier lines of this very pack that were answered: counted already
        record = replace(record, attempts=max(1, tries["sent"] - answered))
        records, settled = self.sender.settle(pack, record, answered_alone=answered if len(pack.rows) == 1 else 0)
        failed = {k for k, r in settled.final.items() if r.state != "ok"}
        return records, failed, set(settled.again)

    def row_keys(self, packs: set[str]) -> set[str]:
        """The rows the pack lines `packs` carry."""
        out: set[str] = set()
        for key in packs:
            found = self.ledger.pack(key)
            out.update([row for row, _ in found[0]] if found else [key])
        return out
