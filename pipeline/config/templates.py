"""Prompt templates: compiled once, at start, in Jinja's immutable sandbox.

Templates come from the trusted config, but they run over untrusted row values, and a template is code:
outside the sandbox `{{ cycler.__init__.__globals__.os.environ }}` reads the environment (the API key)
and `os.popen` runs commands. The immutable sandbox refuses attribute access to internals (`_`-prefixed
names, function globals) and calls that mutate objects, raising `SecurityError` at render time.

Every template is compiled before any input is read or anything is sent: a syntax error, or a filter or
test that does not exist (Jinja only notices those when the branch runs), is a ConfigError naming the
dotted key (exit 2). What can only go wrong at render time (a SecurityError, an undefined name, a type
error in an expression) is the row's problem: the caller turns it into an input failure row.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError


def environment(finalize: Callable[[Any], Any] | None = None) -> jinja2.Environment:
    """The one environment every prompt template renders in."""
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, finalize=finalize, autoescape=False,
                                         keep_trailing_newline=True)


def compile_template(env: jinja2.Environment, source: str, key: str, file: str | None
                     ) -> tuple[jinja2.Template, set[str]]:
    """The compiled template and the variables it reads from the row; ConfigError naming `key`."""
    try:
        ast = env.parse(source)
        _check_names(env, ast)
        template = env.from_string(ast)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"template syntax error on line {exc.lineno}: {exc.message}", key=key, file=file) from None
    return template, set(jinja2.meta.find_undeclared_variables(ast)) - set(env.globals)


def check_prompt(prompt: Any, file: str | None) -> None:
    """Compile every template of a PromptConfig; called when the config is loaded."""
    env = environment()
    for key in ("system", "user"):
        source = getattr(prompt, key)
        if source:
            compile_template(env, source, f"prompt.{key}", file)


def _check_names(env: jinja2.Environment, ast: nodes.Template) -> None:
    """Unknown filters and tests fail at start, not on the first row that reaches them."""
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        known = env.filters if isinstance(node, nodes.Filter) else env.tests
        if node.name not in known:
            kind = "filter" if isinstance(node, nodes.Filter) else "test"
            raise jinja2.TemplateSyntaxError(f"no {kind} named {node.name!r}", node.lineno)


def fixed_prefix(env: jinja2.Environment, source: str) -> tuple[str, int]:
    """(the text a template prints before its first value or tag, characters of fixed text after that).

    The first is the same for every row (prompt caching can mark where it ends); a long second means the
    template puts row content before shared text, which no provider can cache.
    """
    body = env.parse(source).body
    prefix: list[str] = []
    after = 0
    leading = True
    for node in body:
        items = node.nodes if isinstance(node, nodes.Output) else [node]
        for item in items:
            if leading and isinstance(item, nodes.TemplateData):
                prefix.append(item.data)
                continue
            leading = False
            after += sum(len(d.data) for d in ([item] if isinstance(item, nodes.TemplateData)
                                                 else item.find_all(nodes.TemplateData)))
    return "".join(prefix), after
