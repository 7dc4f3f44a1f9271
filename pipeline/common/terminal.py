"""Text from a server on its way to a terminal: control characters shown, never obeyed.

An answer or an error message is untrusted text. Written raw to a terminal, an escape sequence in it
acts: it clears the screen, sets the window title, plants an OSC 8 hyperlink or rewrites the line
before it (a carriage return, a backspace). `printable` spells every such character out as a Python
escape (`\\x1b`, `\\r`, `\\u202e`), so what the server sent is still readable, and nothing in it runs.
Kept as they are: printable text of any script, tab, and (where a caller allows) line breaks.
Escaped: C0 controls and DEL, C1 controls (U+0080-U+009F, which some terminals read as ESC [ and
the like), and the bidirectional overrides that make a line display other than it reads.
"""
from __future__ import annotations

import re

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x08\x0a-\x1f\x7f-\x9f{_BIDI}]")
_CONTROL_KEEP_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")


def _spell(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\r":
        return "\\r"
    if c == "\n":
        return "\\n"
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with its control characters spelled out; `lines`: keep line breaks (a multi-line answer)."""
    pattern = _CONTROL_KEEP_LINES if lines else _CONTROL
    return pattern.sub(_spell, text)
