"""The exception tree drawn in errors.py's docstring is the real class hierarchy, and every class is in it."""
from __future__ import annotations

import inspect
import re

from pipeline import errors

_NODE = re.compile(r"^(?P<indent>[ │]*)(?:[├└]── )?(?P<name>[A-Z]\w+)")


def drawn_tree() -> dict[str, str | None]:
    """Class name -> the parent it is drawn under (None for the root), from the module docstring."""
    assert errors.__doc__ is not None
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        body = line[4:]  # the tree is indented by four spaces in the docstring
        m = _NODE.match(body)
        if not line.startswith("    ") or not m or not ("──" in body or not stack):
            continue
        depth = len(m.group("indent")) + (4 if "──" in body else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group("name")] = stack[-1][1] if stack else None
        stack.append((depth, m.group("name")))
    return parents


def test_the_drawn_tree_is_the_class_hierarchy() -> None:
    tree = drawn_tree()
    classes = {name: cls for name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, Exception) and cls.__module__ == errors.__name__}
    assert set(tree) == set(classes), "every exception class is drawn, and nothing else"
    for name, parent in tree.items():
        bases = [b.__name__ for b in classes[name].__bases__]
        assert bases == [parent or "Exception"], f"{name} is drawn under {parent} but derives from {bases}"


def test_every_exception_class_says_what_it_is_for() -> None:
    for name in drawn_tree():
        cls = getattr(errors, name)
        assert cls.__doc__ and cls.__doc__ != Exception.__doc__, f"{name} has no docstring"


def test_run_stops_carry_a_next_step_and_no_request_fields_where_there_are_none() -> None:
    budget = errors.BudgetExceeded("over")
    assert not hasattr(budget, "status") and not hasattr(budget, "retry_after") and "budget" in budget.hint
    auth = errors.AuthError("no", status=401)
    assert auth.status == 401 and isinstance(auth, errors.RequestError) and "API key" in auth.hint
    assert errors.InternalError("x").exit_code == errors.EXIT_INTERNAL == 70
