"""Secret config values: marked in the config, read from the environment, and secret by default where a
value is a credential whatever the user wrote.

Any value can be marked: `!env NAME` reads it from the environment variable NAME when the config is
loaded (a missing one is a ConfigError naming the key), `!secret VALUE` keeps the value given; both
work in the file and in `--set` (`--set 'notify.webhook=!env SLACK_HOOK'`), and from Python as
`pipeline.config.FromEnv("NAME")` / `Secret("value")`. Secret by default, however they are given:
`notify.webhook` (a Slack or Teams hook URL is a token) and every `input.storage_options` /
`output.storage_options` value whose key names a credential (`key`, `secret`, `token`, `password`, ...).

A secret value is registered with the scrubber (common/redact.py) the moment the config is read, so it
is replaced by `[REDACTED]` in summary.json, manifest.json, pipeline.log, history.jsonl, the webhook's
body, stderr and `pipeline status`; the job's identity (config.request_config) holds the mask, not the
value, so a rotated secret is not "a different job". Values shorter than redact.MIN_SECRET_LENGTH
cannot be told from ordinary text and are not scrubbed.
"""
from __future__ import annotations

import os
import re
from typing import Any

from ..common import redact
from ..errors import ConfigError
from ..yaml_loader import FromEnv, Secret

_CREDENTIAL_KEY = re.compile(r"key|secret|token|passw|credential|session|signature|sas", re.IGNORECASE)
# Dotted keys whose value is secret however it is given.
SECRET_BY_DEFAULT = ("notify.webhook",)
_STORAGE = ("input.storage_options", "output.storage_options")


def resolve(raw: dict[str, Any], file: str) -> None:
    """Replace the `!env` / `!secret` markers in `raw` by their values (in place), each registered with the
    scrubber: marked secret, it stays secret even when it turns out invalid."""
    _walk(raw, "", file)


def register_defaults(raw: dict[str, Any]) -> None:
    """Register the values secret by default, once they validated: a value the config refuses is not
    registered, so a stray `https://` can never mask every URL the process prints afterwards (its error
    message does not show it either: `shown_in_errors`)."""
    for dotted in SECRET_BY_DEFAULT:
        value = _get(raw, dotted)
        if isinstance(value, str):
            redact.register(value)
    for dotted in _STORAGE:
        options = _get(raw, dotted)
        if isinstance(options, dict):
            for key, value in options.items():
                if isinstance(value, str) and _CREDENTIAL_KEY.search(str(key)):
                    redact.register(value)


def shown_in_errors(dotted: str) -> bool:
    """Whether a config error may quote the value at this key (never one secret by default)."""
    return not (dotted in SECRET_BY_DEFAULT or any(dotted.startswith(s + ".") for s in _STORAGE))


def _walk(node: Any, where: str, file: str) -> Any:
    if isinstance(node, dict):
        for key in list(node):
            node[key] = _walk(node[key], f"{where}.{key}" if where else str(key), file)
    elif isinstance(node, list):  # a new list: a caller's own (a dict config) is left as it was
        return [_walk(item, f"{where}.{i}", file) for i, item in enumerate(node)]
    elif isinstance(node, FromEnv):
        return redact.register(_from_env(node.name, where, file))
    elif isinstance(node, Secret):
        return redact.register(node.value)
    return node


def _from_env(name: str, where: str, file: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"!env takes the NAME of an environment variable (letters, digits, _), got {name!r}",
                          key=where, file=file)
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"the environment variable {name} (given with !env) is not set (export {name}=...)",
                          key=where, file=file)
    return value


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


__all__ = ["SECRET_BY_DEFAULT", "FromEnv", "Secret", "register_defaults", "resolve", "shown_in_errors"]
