"""Reading the config's YAML strictly: what PyYAML's safe_load lets through silently is an error here.

- A key given twice in one mapping is refused, naming the key and both lines (safe_load keeps the last
  one, so a job would quietly run with a setting its author did not see).
- Aliases are limited (MAX_ALIASES), and so is the size the document would expand to through them
  (MAX_NODES): a "billion laughs" document that nests aliases of aliases is refused once composed,
  before anything expands it.
- A plain `on`, `off`, `yes` or `no` used as a KEY stays the word: YAML 1.1 (PyYAML) reads them as
  booleans, so `notify: {on: [failure]}` had a key `True` (values keep YAML's booleans: `adaptive: off`).
- A structure deeper than MAX_DEPTH, or one that contains itself (`&a [*a]`), is refused before
  validation or the job fingerprint walk it recursively.

Two tags mark a value secret (config/secrets.py resolves them, in a file and in `--set` alike):
`!env NAME` is the value of the environment variable NAME, `!secret VALUE` is VALUE itself. Either way
the value is used where it belongs and scrubbed from every file, log and message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

MAX_ALIASES = 100
MAX_NODES = 200_000
MAX_DEPTH = 64
_BOOL_TAG, _STR_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:str"
_YAML11_WORDS = frozenset({"on", "off", "yes", "no"})  # booleans only to YAML 1.1, never meant as a key


@dataclass(frozen=True)
class FromEnv:
    """`!env NAME`: the value of an environment variable, read when the config is loaded; secret."""

    name: str


@dataclass(frozen=True)
class Secret:
    """`!secret VALUE`: a value given in the config (or with --set) that must appear nowhere else."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(...)"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and counts aliases as it composes."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (line {mark.line + 1}); a config needs "
                                     "few, and this many is how an alias bomb looks: write the values out")
        return super().compose_node(parent, index)

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if (isinstance(key_node, ScalarNode) and key_node.tag == _BOOL_TAG and key_node.style is None
                    and key_node.value.lower() in _YAML11_WORDS):
                key_node.tag = _STR_TAG
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.YAMLError(f"duplicate key {key!r} on line {line} (first on line {seen[key]}); "
                                         "give each key once")
            except TypeError:  # an unhashable key: the base class reports it
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _scalar(loader: StrictLoader, node: Node, tag: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.YAMLError(f"{tag} takes one plain value (line {node.start_mark.line + 1}), e.g. {tag} VALUE")
    return str(loader.construct_scalar(node))


StrictLoader.add_constructor("!env", lambda loader, node: FromEnv(_scalar(loader, node, "!env").strip()))
StrictLoader.add_constructor("!secret", lambda loader, node: Secret(_scalar(loader, node, "!secret")))


def _check_expansion(root: Node) -> None:
    """Refuse a document whose aliases would expand it past MAX_NODES, before anything expands it.

    An alias is the same node object as its anchor, so the composed graph stays small while its
    expansion (what validation, copying and hashing walk) can be exponential. Sizes are memoised per
    node, so this costs one visit per distinct node; a node reached from itself is refused too."""
    size: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_NODES:
                raise yaml.YAMLError(f"the document expands to more than {MAX_NODES:,} values through its aliases "
                                     f"(line {node.start_mark.line + 1}); this is how an alias bomb looks")
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            raise yaml.YAMLError(f"a value contains itself (line {node.start_mark.line + 1}: an alias inside its "
                                 "own anchor); write it out")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def load(text: str) -> Any:
    """The document, or yaml.YAMLError saying what is wrong and where."""
    return yaml.load(text, Loader=StrictLoader)


def check_shape(value: Any, file: str, key: str = "") -> None:
    """ConfigError naming the key when the loaded value is deeper than MAX_DEPTH or contains itself."""
    stack: list[tuple[Any, int, frozenset[int], str]] = [(value, 0, frozenset(), key)]
    while stack:
        node, depth, path, where = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in path:
            raise ConfigError("a value contains itself (a YAML alias inside its own anchor); write it out",
                              key=where or None, file=file)
        if depth >= MAX_DEPTH:
            raise ConfigError(f"nested more than {MAX_DEPTH} levels deep; no config (or JSON Schema) needs that",
                              key=where or None, file=file)
        inner = path | {id(node)}
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, child in items:
            # Name the section and its key; deeper parts of the path would only make the message long.
            name = where if where.count(".") >= 1 else (f"{where}.{k}" if where else str(k))
            stack.append((child, depth + 1, inner, name))
