"""The dry run of a cascade and an audit: what the later stages and the reference model add.

The dry run's request figures (engines/estimate.py) are the first stage's. Worst case: every row to send
also goes through every later stage (each at its own price, the same prompt and max_tokens). Likely case,
once the first stage has answered some rows of this job: the share of its answers under its
min_confidence (or failed) goes on, compounded stage by stage, with the likely output per request. The
audit adds its share of the rows at the reference model's price (nothing where that model is a stage:
those answers are shared). In run.mode: batch every stage and the audit are priced at their batch rates,
as their lines are charged. The budget verdict uses the range with these added.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config
from ..models.prices import find_price

if TYPE_CHECKING:
    from .estimate import Estimate


@dataclass
class Escalation:
    """The first stage's answers already in the store: how many have a confidence, how many go on."""

    known: int = 0
    onward: int = 0

    def add(self, store: sqlite3.Connection | None, keys: Iterable[str], threshold: float | None) -> None:
        if store is None or threshold is None:
            return
        unique = list(keys)
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            sql = f"SELECT state, confidence FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
            for state, confidence in store.execute(sql, chunk):
                if state == "transient":
                    continue  # asked again: not known yet
                self.known += 1
                self.onward += state != "ok" or confidence is None or confidence < threshold

    @property
    def share(self) -> float | None:
        return self.onward / self.known if self.known else None


def extra_cost(est: Estimate, cfg: Config) -> tuple[float | None, float] | None:
    """(likely, worst) USD the later stages and the audit add to the first stage's; None without a price."""
    later = [s.model for s in (cfg.cascade or [])[1:]]
    audit = cfg.quality.audit
    stages = {s.model for s in cfg.cascade or []} | {cfg.endpoint.model}
    audited = [(audit.model, audit.share)] if audit is not None and audit.model not in stages else []
    share = est.escalation.share
    votes = cfg.quality.samples_by_requests(cfg.endpoint.base_url)  # K requests a row and stage (quality.vote_by)
    likely: float | None = 0.0
    worst = 0.0
    batch = cfg.run.mode == "batch"  # every stage's lines go through the Batch API: its prices
    first = find_price(cfg, cfg.endpoint.model, batch=batch)
    if votes > 1 and first is not None:  # the first stage's other K-1 samples
        worst += (votes - 1) * (est.prompt_tokens * first.input_per_m / 1e6 + est.output_max * first.output_per_m / 1e6)
        likely = (votes - 1) * _likely(est, first.input_per_m, first.output_per_m) \
            if est.output_likely_per_request is not None else None
    for k, model in enumerate(later, start=1):
        price = find_price(cfg, model, batch=batch)
        if price is None:
            return None
        worst += votes * (est.prompt_tokens * price.input_per_m / 1e6 + est.output_max * price.output_per_m / 1e6)
        if likely is not None and share is not None and est.output_likely_per_request is not None:
            likely += votes * share ** k * _likely(est, price.input_per_m, price.output_per_m)
        else:
            likely = None
    for model, fraction in audited:
        price = find_price(cfg, model, batch=batch)
        if price is None:
            return None
        worst += fraction * (est.prompt_tokens * price.input_per_m / 1e6 + est.output_max * price.output_per_m / 1e6)
        if likely is not None and est.output_likely_per_request is not None:
            likely += fraction * _likely(est, price.input_per_m, price.output_per_m)
        else:
            likely = None
    return likely, worst


def _likely(est: Estimate, input_per_m: float, output_per_m: float) -> float:
    assert est.output_likely_per_request is not None
    return est.prompt_tokens * input_per_m / 1e6 + est.requests * est.output_likely_per_request * output_per_m / 1e6


def describe(est: Estimate, cfg: Config) -> list[str]:
    """The dry run's lines about the cascade and the audit."""
    lines = []
    votes = cfg.quality.samples_by_requests(cfg.endpoint.base_url)
    if votes > 1:
        lines.append(f"votes: {votes} requests a row and stage (quality.vote_by), the figures above are one of them")
    if cfg.cascade:
        names = " -> ".join(f"{s.model}" + (f" (>= {s.min_confidence:g})" if s.min_confidence is not None else "")
                            for s in cfg.cascade)
        share = est.escalation.share
        lines.append(f"cascade {names}; the figures above are the first stage's")
        lines.append("worst case: every row also through every later stage" + (
            f"; likely: {share:.0%} go on (of {est.escalation.known:,} first-stage answers in this job)"
            if share is not None else "; likely: unknown until the first stage has answered some rows"))
    if cfg.quality.audit is not None:
        a = cfg.quality.audit
        lines.append(f"audit: {a.share:.1%} of the rows also answered by {a.model}"
                     + (f", gate min_agreement {a.min_agreement:g}" if a.min_agreement is not None else ""))
    return lines
