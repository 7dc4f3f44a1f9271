"""A run's process does not import pandas unless its caller already has (48 MB of a ~240 MB peak).

pyarrow imports pandas the first time it converts a Python list (`pa.array`, `Table.from_pylist`), only
to ask whether the list is a pandas object, and remembers the answer for the life of the process. No
run converts pandas objects (pipeline.run(df=...) hands one over with pandas already imported, and then
nothing here happens). `keep_pandas_out()` lets pyarrow ask that first question while pandas cannot be
found, so pyarrow records "no pandas" and converts lists without it.

Nothing else changes for the process: pyarrow asks again, and imports pandas, wherever it needs pandas
(`to_pandas()`, `Table.from_pandas()`); and the moment anything imports pandas later (a notebook cell,
Ray, altair), a one-shot import hook makes pyarrow look again as soon as pandas is loaded, so a pandas
object given to `pa.array` afterwards converts exactly as it would have (NaN as null included).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

import pyarrow as pa

_lock = threading.Lock()
_done = False


class _HoldBack(importlib.abc.MetaPathFinder):
    """While pyarrow asks its question: pandas cannot be found."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"{name} is held back while pyarrow starts", name=name)


class _LookAgain(importlib.abc.MetaPathFinder):
    """When pandas is imported after all: once it is loaded, pyarrow takes it up (to_pandas() asks again)."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "pandas":
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        spec = importlib.util.find_spec("pandas")  # the real finders, now that this one is gone
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        load = loader.exec_module

        def load_then_tell_pyarrow(module: ModuleType) -> None:
            load(module)
            pa.table({"_": pa.array([], pa.int8())}).to_pandas()  # pyarrow's shim imports pandas again: found

        loader.exec_module = load_then_tell_pyarrow  # type: ignore[method-assign]  # this spec's loader only
        return spec


def keep_pandas_out() -> None:
    """Before the run's first Arrow conversion; a no-op when pandas is already imported (or once done)."""
    global _done
    with _lock:
        if _done or "pandas" in sys.modules:
            return
        _done = True
        hold = _HoldBack()
        sys.meta_path.insert(0, hold)
        try:
            pa.array([0])  # pyarrow's first conversion: it looks for pandas now, and remembers it found none
        finally:
            sys.meta_path.remove(hold)
        sys.meta_path.insert(0, _LookAgain())
