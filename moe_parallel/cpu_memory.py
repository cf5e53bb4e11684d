"""Host-memory reuse for CPU runs: keep freed tensor memory in the process heap.

PyTorch's CPU allocator takes every tensor from glibc ``malloc``. glibc serves a request above
its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and unmaps them on ``free``, so
each large tensor of every step pays one page fault per 4 KiB page when first written, and on a
virtual machine a fault costs more than the copy that fills the page. An MoE step allocates
many such tensors: ``[T·k, H]`` permuted rows, ``[T·k, 2F]`` expert activations and their
gradients.

``reuse_freed_memory()`` sets two glibc ``mallopt`` parameters for the whole process:
``M_MMAP_MAX = 0`` (serve every request from the heap; threads other than the main one may
still map large blocks) and ``M_TRIM_THRESHOLD`` at its maximum (never return freed heap
memory to the system). The next step then reuses the pages of the previous one, as the CUDA
caching allocator does on GPUs. The cost: the process's resident memory stays at its peak.
``MOE_PARALLEL_HEAP_REUSE=0`` in the environment makes ``reuse_freed_memory()`` a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
_TRIM_MAX = 2**31 - 1  # mallopt takes an int

ENV_VAR = "MOE_PARALLEL_HEAP_REUSE"
_enabled = False


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); idempotent.

    Returns True when the settings are in effect; False where the C library is not glibc or
    ``MOE_PARALLEL_HEAP_REUSE=0`` (nothing is changed then).
    """
    global _enabled
    if _enabled:
        return True
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, _TRIM_MAX) != 1:
        raise RuntimeError("glibc mallopt rejected M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
    _enabled = True
    return True


def reusing_freed_memory() -> bool:
    """Whether ``reuse_freed_memory()`` has taken effect in this process."""
    return _enabled
