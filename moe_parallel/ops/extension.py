"""Loading of the compiled extension ``moe_parallel._C`` and its torch.library registrations.

Importing ``moe_parallel._C`` registers the ops ``torch.ops.moe_parallel.<name>`` for every name
in ``OP_NAMES``. ``has_extension()`` is True when that import succeeded and every op is there;
``extension_error()`` is the exception that prevented it. With
``MOE_PARALLEL_REQUIRE_EXTENSION=1`` a failure to load is an ``ImportError`` carrying the cause.

``register(name, fake, setup, backward)`` is what each op family calls once, at import: with the
extension loaded it registers the op's fake (meta) kernel and, when given, its autograd formula
``setup(ctx, args: dict, output)`` / ``backward(ctx, *grads) -> {arg name: grad}``; without the
extension it does nothing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Optional

import torch

OP_NAMES = (
    "permute",
    "unpermute",
    "unpermute_backward",
    "sort_chunks",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "block_topology",
    "bsr_sdd",
    "bsr_dsd",
    "bsr_wgrad",
    "swiglu",
    "swiglu_backward",
    "clamped_swiglu",
    "clamped_swiglu_backward",
    "expert_dropout",
)
_REQUIRE_ENV = "MOE_PARALLEL_REQUIRE_EXTENSION"
_REGISTERED: set[str] = set()  # ops whose fake kernel (and autograd formula) are registered


def _load_extension() -> Optional[BaseException]:
    """Import ``moe_parallel._C``; return the failure (None on success)."""
    try:
        importlib.import_module("moe_parallel._C")  # registers torch.ops.moe_parallel.*
    except Exception as exc:  # ImportError, OSError (bad .so), RuntimeError (registration)
        return exc
    missing = [n for n in OP_NAMES if not hasattr(torch.ops.moe_parallel, n)]
    if missing:
        return ImportError(f"moe_parallel._C loaded but does not register {missing}")
    return None


_EXT_ERROR = _load_extension()
if _EXT_ERROR is not None and os.environ.get(_REQUIRE_ENV, "") == "1":
    raise ImportError(
        f"{_REQUIRE_ENV}=1 but moe_parallel._C failed to load: "
        f"{type(_EXT_ERROR).__name__}: {_EXT_ERROR}"
    ) from _EXT_ERROR


def has_extension() -> bool:
    """True when ``moe_parallel._C`` is loaded and registers every ``moe_parallel`` op."""
    return _EXT_ERROR is None


def extension_error() -> Optional[BaseException]:
    """The exception that prevented loading ``moe_parallel._C`` (None when loaded)."""
    return _EXT_ERROR


def _arg_names(name: str) -> list[str]:
    """Argument names of ``moe_parallel::<name>`` in schema order."""
    return [a.name for a in getattr(torch.ops.moe_parallel, name).default._schema.arguments]


def _autograd_rule(name: str, setup: Callable, backward: Callable):
    """Adapt ``setup(ctx, args: dict, output)`` / ``backward(ctx, *grads) -> dict`` to
    torch.library's positional ``inputs`` tuple and per-argument gradient tuple."""
    names = _arg_names(name)

    def setup_context(ctx, inputs, output):
        setup(ctx, dict(zip(names, inputs)), output)

    def backward_fn(ctx, *grads):
        got = backward(ctx, *grads)
        return tuple(got.get(n) for n in names)

    return backward_fn, setup_context


def register(
    name: str,
    fake: Callable,
    setup: Optional[Callable] = None,
    backward: Optional[Callable] = None,
) -> None:
    """Register the fake kernel of ``moe_parallel::<name>`` and, with ``setup`` and ``backward``,
    its autograd formula; a no-op without the extension. Called once per op, by its family's
    module at import; a second call for the same op raises (torch.library would silently
    replace the first registration)."""
    if not has_extension():
        return
    if name in _REGISTERED:
        raise RuntimeError(f"moe_parallel::{name} is already registered")
    _REGISTERED.add(name)
    torch.library.register_fake(f"moe_parallel::{name}", fake)
    if setup is not None:
        backward_fn, setup_context = _autograd_rule(name, setup, backward)
        torch.library.register_autograd(
            f"moe_parallel::{name}", backward_fn, setup_context=setup_context
        )
