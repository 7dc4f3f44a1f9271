"""Batch LLM labelling over OpenAI-compatible chat-completions APIs.

    import pipeline
    summary = pipeline.run("configs/demo.yaml")      # or a dict / Config, with overrides
    df = pipeline.load(summary.out_dir)              # polars DataFrame, output fields as columns
    pipeline.report([out_a, out_b], gold="label")    # HTML inline in Jupyter; .tables as polars frames
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "PipelineError", "Summary", "load", "load_config", "report", "run", "run_async"]

# Imported on first use: `pipeline --help` and `import pipeline` stay fast (no polars/aiohttp import).
_LAZY = {
    "Config": ".config", "load_config": ".config", "PipelineError": ".errors", "Summary": ".write.output",
    "load": ".write.output", "run": ".engines.api", "run_async": ".engines.runner",
    "report": ".reporting",  # not pipeline/report/: importing a submodule would shadow the function
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
