"""The local answer store: this job's SQLite store first, then the shared cross-run cache (cache.dir).

Implements `store.AnswerStore` for the local runner. A lookup returns what a resume reuses: answers,
and failures that a re-run would not ask again (only answers with --retry-failed); an answer found in
the shared cache is copied into this job's store (free: cost 0, marked cache_hit). A new answer is
copied to the cache in the cache's own group commit, after it is safe in this job's store; a cache
that cannot be written only warns, while this job's store that cannot be written stops the run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
from collections.abc import Collection

from ..common import diagnosis
from ..errors import RunFatalError
from ..send.stats import Stats
from ..vocab import FINAL_STATES, Record
from .store import Store

log = logging.getLogger("pipeline")


class LocalAnswers:
    def __init__(self, store: Store, cache: Store | None, stats: Stats, *, retry_failed: bool) -> None:
        self.store, self.cache, self.stats = store, cache, stats
        # The stored states a lookup counts as answered (batch mode widens it for its write pass).
        self.keep: frozenset[str] = frozenset({"ok"}) if retry_failed else FINAL_STATES
        self.asked_again: set[str] = set()  # keys whose stored failed answer is asked again (rows retried)

    def lookup(self, keys: Collection[str]) -> dict[str, Record]:
        found = self.store.get_many(keys)
        records = {k: r for k, r in found.items() if r.state in self.keep}
        self.asked_again.update(k for k in found if k not in records)
        if self.cache is not None:
            missing = [k for k in keys if k not in records]
            hits = [r for r in self.cache.get_many(missing, with_raw=True).values() if r.state == "ok"] \
                if missing else []
            for r in hits:
                r.cache_hit, r.cost_usd, r.created_at = True, 0.0, 0.0
            if hits:
                self.store.put_now(hits)
                self.stats.reused(cache_hits=len(hits))
                records.update({r.key: r for r in hits})
        return records

    async def put(self, record: Record) -> None:
        try:
            await self.store.put(record)
        except (OSError, sqlite3.Error) as exc:
            # Disk full or an I/O error: nothing more can be recorded. Stop; what is committed stays.
            # The message names the cause (no space, too many open files, ...), not a guess.
            known = diagnosis.explain(exc, os.path.dirname(self.store.path))
            raise RunFatalError(known[0] if known else f"cannot write to {self.store.path}: {exc}; fix the error, "
                                "then re-run the same command to resume") from exc
        if self.cache is not None:
            await self._copy_to_cache(record)

    def note(self, name: str, value: str) -> None:
        self.store.set_meta(name, value)

    async def _copy_to_cache(self, record: Record) -> None:
        assert self.cache is not None
        try:
            await self.cache.put(dataclasses.replace(record, cache_hit=False, created_at=0.0))
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not add an answer to the cache %s: %s", self.cache.path, exc)
