"""`output.metrics_file`: the job's figures (ops/figures.py) for Prometheus.

`write_metrics` writes the Prometheus text format (node_exporter's textfile collector convention:
written to a temp file and renamed, so the collector never reads half a file), through
prometheus_client so the format is the library's, not ours. The runner writes it every 30 s during a
run and once at the end.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..common import safefs
from .figures import Figures


class _Collector(Collector):
    def __init__(self, f: Figures) -> None:
        self.f = f

    def collect(self) -> Iterator[Any]:
        f, job = self.f, [self.f.job]
        rows = GaugeMetricFamily("pipeline_rows", "Input rows by state, as of this run", labels=["job", "state"])
        for state, n in f.rows.items():
            rows.add_metric([f.job, state], n)
        yield rows
        req = CounterMetricFamily("pipeline_requests", "Attempts this run by outcome status class",
                                  labels=["job", "status_class"])
        for cls, n in sorted(f.requests.items()):
            req.add_metric([f.job, cls], n)
        yield req
        yield _counter("pipeline_rate_limited", "429 answers this run", f.job, f.rate_limited)
        tokens = CounterMetricFamily("pipeline_tokens", "Tokens paid for this run", labels=["job", "kind"])
        tokens.add_metric([f.job, "prompt"], f.prompt_tokens)
        tokens.add_metric([f.job, "completion"], f.completion_tokens)
        tokens.add_metric([f.job, "cached"], f.cached_tokens)  # part of prompt: read from the provider's cache
        yield tokens
        yield _counter("pipeline_prompt_cache_saved_usd", "What the provider's prompt cache saved this run, USD",
                       f.job, f.cache_saved_usd)
        yield _counter("pipeline_cost_usd", "Spend of this run in USD", f.job, f.run_cost_usd)
        yield _gauge("pipeline_job_cost_usd", "Spend of the job over all its runs in USD", job, f.job_cost_usd)
        if f.last_success is not None:
            yield _gauge("pipeline_last_success_timestamp_seconds", "When the last request succeeded", job,
                         f.last_success)
        yield _gauge("pipeline_run_start_timestamp_seconds", "When this run started", job, f.started)
        yield _gauge("pipeline_run_running", "1 while the run is going, 0 once it ended", job, int(f.running))
        if f.agreement:
            agree = GaugeMetricFamily("pipeline_audit_agreement", "The audit's agreement with the reference model "
                                      "per field: the share and its 95% interval", labels=["job", "field", "bound"])
            for name, (share, low, high) in sorted(f.agreement.items()):
                for bound, value in (("share", share), ("low", low), ("high", high)):
                    agree.add_metric([f.job, name, bound], value)
            yield agree
        if f.exit_code is not None:
            yield _gauge("pipeline_run_exit_code", "How the last run ended (see the README's exit codes)", job,
                         f.exit_code)


def _counter(name: str, doc: str, job: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["job"])
    c.add_metric([job], value)
    return c


def _gauge(name: str, doc: str, job: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["job"])
    g.add_metric(job, value)
    return g


def write_metrics(path: str, figures: Figures) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(figures))
    # Not prometheus_client's write_to_textfile: its temporary name is predictable and opened through
    # links, and the textfile folder is often shared; safefs uses an unpredictable O_EXCL name, then rename.
    safefs.write_atomic(path, generate_latest(registry))
