"""Every YAML snippet in README.md and docs/*.md loads as the config reads it (issue 19 item 11).

A fenced ```yaml block is read with the config's own YAML loader and each of its sections validated
by that section's model; an inline `section: {…}` span is a whole section and validated too; an inline
`section.key: value` span must name a real key. The README's own `notify: {…, on: [failure]}` was
refused once (YAML 1.1 reads a bare `on` as true): a user copies these, so they must work.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline import yaml_loader
from pipeline.config import Config, load_config, secrets
from tests.conftest import REPO, job

_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([a-z_]+(?:\.[a-z_]+)*): ([^`]+)`")
_SECTIONS = {name for name in Config.model_fields if name != "source"}


def _snippets() -> list[tuple[str, str, str]]:
    """(where, kind, text) for every YAML block and every inline span that starts with a config section."""
    out = []
    for doc in _DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            out.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", "block", m.group(1)))
        for m in _INLINE.finditer(text):
            if m.group(1).split(".")[0] in _SECTIONS:
                out.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", "inline", m.group(0).strip("`")))
    return out


def _section_errors(name: str, value: Any) -> list[str]:
    """What the section's model says of the value; a snippet shows a few keys, so missing ones are fine."""
    try:
        TypeAdapter(Config.model_fields[name].annotation).validate_python(value)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors() if e["type"] != "missing"]
    return []


def _known_key(dotted: list[str]) -> bool:
    model: Any = Config
    for part in dotted:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return True  # a free-form mapping (headers, secret_headers, simulator): any key
        field = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if field is None:
            return False
        inner = [a for a in (getattr(field.annotation, "__args__", None) or (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return True


SNIPPETS = _snippets()


def test_the_docs_have_yaml_snippets_to_check() -> None:
    kinds = {kind for _, kind, _ in SNIPPETS}
    assert kinds == {"block", "inline"} and len(SNIPPETS) >= 10


@pytest.mark.parametrize(("where", "kind", "text"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_every_yaml_snippet_in_the_docs_loads(where: str, kind: str, text: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = yaml_loader.load(text)
    assert isinstance(loaded, dict), f"{where}: not a mapping"
    for name in re.findall(r"!env\s+([A-Za-z_][A-Za-z0-9_]*)", text):  # a snippet's `!env NAME`, as if set
        monkeypatch.setenv(name, f"https://{name.lower()}.example/value")
    secrets.resolve(loaded, where)  # !env / !secret values, as load_config resolves them
    for key, value in loaded.items():
        assert isinstance(key, str), f"{where}: key {key!r} is not a string"
        dotted = key.split(".")
        assert dotted[0] in _SECTIONS, f"{where}: {key!r} is not a config section"
        if len(dotted) == 1 and (kind == "block" or isinstance(value, dict)):
            assert not _section_errors(key, value), f"{where}: {key}: {_section_errors(key, value)}"
        else:
            assert _known_key(dotted), f"{where}: {key!r} is not a config key"


def test_on_as_a_key_is_the_word_and_as_a_value_still_a_boolean(tmp_path: Path) -> None:
    cfg = job(tmp_path, 2)
    del cfg["limits"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg) + "notify: {webhook: https://hooks.example/pipeline, on: [failure, success]}\n"
                    "limits:\n  adaptive: off\n  max_concurrency: 4\n")
    loaded = load_config(path)
    assert loaded.notify.on == ["failure", "success"]
    assert loaded.limits.adaptive is False  # a value keeps YAML's booleans
