"""Shared fixtures: small real datasets and job configs pointed at the built-in simulator."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "score"],
}


def write_rows(path: Path, n: int, *, start: int = 0, dup_every: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(start, start + n):
            text = f"review number {i // dup_every if dup_every else i}: works fine, arrived late"
            fh.write(json.dumps({"rid": f"r{i:06d}", "text": text, "stars": i % 5 + 1}) + "\n")
    return path


def job(tmp_path: Path, rows: int = 20, *, sim: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A job config dict over `rows` generated rows, answered by an in-process simulator."""
    data = tmp_path / "in.jsonl"
    if not data.exists():
        write_rows(data, rows)
    cfg: dict[str, Any] = {
        "input": {"path": str(data), "id_column": "rid", "columns": ["stars"]},
        "endpoint": {"base_url": "simulator", "model": "openai/gpt-4-turbo", "simulator": {"retry_after_s": 0.01, **(sim or {})}},
        "prompt": {"system": "You label reviews.", "user": "Review: {{ text }}"},
        "params": {"temperature": 0, "max_tokens": 200},
        "structured": {"schema": SCHEMA},
        "limits": {"requests_per_minute": None, "max_concurrency": 16, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "output": {"dir": str(tmp_path / "out")},
        "run": {"progress": False},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture
def repo() -> Path:
    return REPO
