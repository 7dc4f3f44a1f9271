"""Batch mode's rounds for a cascade, the audit and votes as requests: what each row needs next.

In sync mode a cascade asks a row's next stage as soon as the stage before has answered it. In batch mode
answers come back a file at a time, so a job goes in rounds: every row's first-stage requests go into the
first files (with the audit's, which do not wait for a decision, see core/cascade.py); once a file is
collected, the rows it answered are walked again through `Trust.needs` over the store's answers, and the
requests they need now (the next stage for rows under min_confidence or failed, the K samples of votes as
requests) go into new files of their own model (a Batch API file carries one model). The driver goes
round until nothing is in flight and no row needs anything; then the engine pass decides every row from
the store, with the same walk, sending nothing.

Which input batches are walked again: those a collected file served (`serves`, kept in memory: the first
round of every run walks the whole input, which rebuilds it), so a round costs the rows that moved, not
the whole input. A batch whose rows are all decided is not walked again in this run (the store only
grows); a structured-mode fallback walks everything again (every request is shaped anew).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..vocab import Request
from .collect import worst_line_cost

if TYPE_CHECKING:
    from .driver import BatchDriver


class Rounds:
    def __init__(self, driver: BatchDriver) -> None:
        self.d = driver
        self.serves: dict[int, set[int]] = {}  # chunk -> input batches waiting for its lines
        self.dirty: set[int] | None = None  # input batches to walk again; None: all of them
        self.decided: set[int] = set()  # input batches whose every row is decided

    @property
    def due(self) -> bool:
        """Whether some input batch has to be walked again."""
        return self.dirty is None or bool(self.dirty)

    def everything(self) -> None:
        """Walk the whole input again (the requests' shape changed)."""
        self.dirty = None
        self.decided.clear()

    def collected(self, chunk: int) -> None:
        """A chunk's answers are in the store: the batches it served need walking again."""
        served = self.serves.pop(chunk, set())
        if self.dirty is not None:
            self.dirty |= served

    def inherit(self, old: int, new: Iterable[int | None]) -> None:
        """Lines of chunk `old` copied into the chunks `new` (sent again, or split to fit the budget)."""
        served = self.serves.get(old)
        if served:
            for chunk in new:
                if chunk is not None:
                    self.serves.setdefault(chunk, set()).update(served)

    async def write(self) -> int:
        """Walk the batches due; stream the requests no answer and no live file covers into files."""
        d = self.d
        todo, self.dirty = self.dirty, set()
        written = 0
        try:
            for batch in d.batches():
                if batch.index in self.decided or (todo is not None and batch.index not in todo):
                    continue
                assert d.engine.route is not None
                wanted, complete = await d.engine.route(batch, d.known)
                if complete:
                    self.decided.add(batch.index)
                written += self._write(batch.index, wanted)
                await asyncio.sleep(0)  # let Ctrl-C and the store's commits in
                if d.engine.stop_reason:
                    break
        except BaseException:
            for writer in d.all_writers():
                writer.abandon()  # the next run drops the half-written files and renders their lines again
            raise
        return written

    def _write(self, index: int, wanted: dict[str, tuple[str, Request]]) -> int:
        d = self.d
        keys = [k for k in wanted if k not in d.settled and k not in d.to_sync]
        packed: dict[str, list[str]] = {}  # a packing model's rows: written as its packs (below)
        for key in keys:
            if wanted[key][0] in d.lane_packs:
                packed.setdefault(wanted[key][0], []).append(key)
        keys = [k for k in keys if wanted[k][0] not in d.lane_packs]
        carried = d.ledger.carriers(keys)
        written = sum(self._write_packs(index, model, [(k, wanted[k][1]) for k in rows])
                      for model, rows in packed.items())
        for key in keys:
            chunk = carried.get(key)
            if chunk is None:
                model, req = wanted[key]
                writer, (cfg, _) = d.writer_for(model), d.engine.lane(model)
                writer.add(key, req.payload, req.est_prompt, req.n_images,
                           worst_line_cost(cfg, req.est_prompt, req.max_tokens, req.n_images))
                chunk = writer.current
                written += 1
            if chunk is not None:
                self.serves.setdefault(chunk, set()).add(index)
        for writer in d.all_writers():
            writer.flush()
        return written

    def _write_packs(self, index: int, model: str, rows: list[tuple[str, Request]]) -> int:
        """A packing model's rows (prompt.rows_per_request > 1) as pack lines of its files, packed as sync mode
        packs that stage (rows a pack line in flight carries wait for it; rows to ask alone go alone)."""
        d = self.d
        bp = d.lane_packs[model]
        carried = bp.carriers([k for k, _ in rows])
        for chunk in set(carried.values()):
            self.serves.setdefault(chunk, set()).add(index)
        writer, (cfg, _) = d.writer_for(model), d.engine.lane(model)
        written = 0
        for line in bp.lines([req for key, req in rows if key not in carried]):
            writer.add(line.key, line.payload, line.est_prompt, line.n_images,
                       worst_line_cost(cfg, line.est_prompt, line.max_tokens, line.n_images))
            written += 1
            if writer.current is not None:
                self.serves.setdefault(writer.current, set()).add(index)
        return written
