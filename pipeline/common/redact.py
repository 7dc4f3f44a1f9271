"""One scrubber for every secret value: the API key and every secret header value.

A server may echo what it was sent (an error body quoting the key, an exception naming a header), and
text from the network ends up in the store, the Parquet outputs, summary.json, stderr and logs. So each
secret is registered the moment it is read from the environment (`register`, called by the config), and
text is scrubbed where it enters and again where it is kept:

    transport   reply bodies (plain and streamed) and the messages of the errors it raises
    store       message, content and raw body of every record, before it is written
    output      failure messages and contents in the part files
    logging     every log record (a record factory, so no handler or child logger can skip it)
    cli         whatever is printed as an error

Each secret is replaced in its plain, JSON-escaped (`\\/`, `\\uXXXX`) and URL-encoded spellings by
`[REDACTED]`, which keeps a JSON body valid. Values shorter than MIN_SECRET_LENGTH are not scrubbed: they
cannot be told from ordinary text (a local server's "EMPTY" key), and scrubbing them would corrupt answers.
The registry is per process and only grows: a secret once seen stays scrubbed.
"""
from __future__ import annotations

import logging
import threading
import urllib.parse
from typing import Any, TypeVar

import orjson

MIN_SECRET_LENGTH = 8
MASK = "[REDACTED]"

_lock = threading.Lock()
_secrets: set[str] = set()
_text: tuple[str, ...] = ()
_bytes: tuple[bytes, ...] = ()
_factory_installed = False

E = TypeVar("E", bound=BaseException)


def register(value: str) -> str:
    """Remember a secret so every later scrub removes it; returns the value for convenient chaining."""
    global _text, _bytes
    if len(value) < MIN_SECRET_LENGTH or value in _secrets:
        return value
    with _lock:
        _secrets.add(value)
        spellings = {s for v in _secrets for s in _spellings(v)}
        # Longest first: a spelling that contains another must be replaced whole.
        _text = tuple(sorted(spellings, key=len, reverse=True))
        _bytes = tuple(s.encode("utf-8") for s in _text)
        _install_log_factory()
    return value


def active() -> bool:
    return bool(_text)


def scrub(text: str) -> str:
    for s in _text:
        if s in text:
            text = text.replace(s, MASK)
    return text


def scrub_bytes(data: bytes) -> bytes:
    for s in _bytes:
        if s in data:
            data = data.replace(s, MASK.encode())
    return data


def scrub_any(value: Any) -> Any:
    """Strings, bytes and the strings inside dicts and lists (a billed body, error metadata)."""
    if not _text:
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (bytes, bytearray)):
        return scrub_bytes(bytes(value))
    if isinstance(value, dict):
        return {scrub_any(k): scrub_any(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_any(v) for v in value]
    return value


def scrub_error(exc: E) -> E:
    """The same exception with its message, args and text attributes scrubbed (in place)."""
    if not _text:
        return exc
    exc.args = tuple(scrub_any(a) for a in exc.args)
    for name in ("message", "content", "detail", "billed"):
        if isinstance(getattr(exc, name, None), (str, bytes, dict, list)):
            setattr(exc, name, scrub_any(getattr(exc, name)))
    return exc


def _spellings(value: str) -> set[str]:
    out = {value, value.replace("/", "\\/"), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    escaped = orjson.dumps(value).decode()[1:-1]
    out.add(escaped)
    # Python's json.dumps (ensure_ascii) escapes every non-ASCII character as \uXXXX.
    out.add("".join(c if ord(c) < 128 else f"\\u{ord(c):04x}" for c in escaped))
    return {s for s in out if s}


def _install_log_factory() -> None:
    """Scrub every log record as it is made: covers every logger, handler and format."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _text:
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string: leave it to the handler to report
                return record
            record.msg, record.args = scrub(text), None
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True
