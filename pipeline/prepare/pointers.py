"""JSON pointers (RFC 6901) into a schema: where an error or a note is, and local $ref resolution."""
from __future__ import annotations

from typing import Any
from urllib.parse import unquote


def pointer(parts: Any) -> str:
    """A JSON pointer (RFC 6901) from path segments; the root is shown as "(root)" for readability."""
    text = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    return text or "(root)"


def join_pointer(ptr: str, *parts: Any) -> str:
    """`ptr` extended by more segments."""
    base = "" if ptr == "(root)" else ptr
    return base + pointer(parts)


def resolve_ref(root: dict[str, Any], ref: str) -> Any:
    """Follow a local reference ("#", "#/$defs/x", "#/definitions/x"); KeyError when it leads nowhere."""
    if not ref.startswith("#"):
        raise KeyError(ref)
    node: Any = root
    frag = ref[1:]
    if frag and not frag.startswith("/"):
        raise KeyError(ref)  # plain-name fragments ($anchor) are not supported
    for raw in frag.split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node
