"""``eager_only``: ``torch.compiler.disable`` without importing ``torch._dynamo`` at import time.

``torch.compiler.disable(fn)`` imports ``torch._dynamo`` (about 2 s of CPU per process) when it
decorates, so every process that imports the package would pay for it, compiling or not.
``eager_only(fn)`` returns a wrapper that calls ``fn`` directly while ``torch._dynamo`` is not
loaded (then nothing can be tracing it) and ``torch.compiler.disable(fn)`` once it is: the
disabled function is made the moment ``torch._dynamo`` finishes importing (an import hook on
``sys.meta_path``), so the first trace already finds it and compiled code sees the same skipped
call (one graph break, or the ``fullgraph=True`` error) as with the decorator itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["eager_only"]

F = TypeVar("F", bound=Callable[..., Any])

_DYNAMO = "torch._dynamo"
_pending: list[tuple[list, Callable[..., Any], Callable[..., Any]]] = []  # (holder, fn, wrapper)
_lock = threading.Lock()


def _disable(holder: list, fn: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Fill ``holder`` with ``torch.compiler.disable(fn)`` and mark ``wrapper`` as dynamo
    marks the functions it skips (``torch._dynamo.decorators.skip``: its frames are never
    converted, a call to it is a skipped call), so that a trace breaks at the wrapper's call
    site, as at a disabled function's, instead of inside it."""
    holder.append(torch.compiler.disable(fn))
    from torch._dynamo import decorators

    skip = getattr(decorators, "skip", None)
    if skip is not None:
        skip(wrapper)


def _disable_pending() -> None:
    with _lock:
        for holder, fn, wrapper in _pending:
            if not holder:
                _disable(holder, fn, wrapper)
        _pending.clear()


class _AfterDynamoImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for ``torch._dynamo`` it hands back the normal spec with a loader
    that runs ``_disable_pending`` once the module has executed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _DYNAMO:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; the lookup below must not find this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _disable_pending()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_finder = _AfterDynamoImport()


def eager_only(fn: F) -> F:
    """``fn`` run eagerly even inside a ``torch.compile``d region, as ``torch.compiler.disable``
    would make it, with ``torch._dynamo`` imported only by whoever compiles."""
    holder: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not holder and _DYNAMO in sys.modules:  # loaded without the hook seeing it
            _disable_pending()
        return (holder[0] if holder else fn)(*args, **kwargs)

    if _DYNAMO in sys.modules:
        _disable(holder, fn, call)
    else:
        with _lock:
            _pending.append((holder, fn, call))
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
    return call  # type: ignore[return-value]
