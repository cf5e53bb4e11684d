"""Exact memory counts of one step (deterministic: no process-level measure such as RSS).

* ``saved_tensor_bytes(forward, params)``: the bytes autograd keeps for the backward of one
  ``forward()``: every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
  custom ``ctx.save_for_backward`` included) counted once per distinct storage
  (``untyped_storage().data_ptr()``, ``nbytes()`` of the whole storage). Storages of ``params``
  (the module's parameters) are reported apart: ``{"activations": bytes, "params": bytes}``.
* ``peak_live_bytes(step, device)``: the peak of the bytes of live tensors during ``step()``,
  above what was live when it started: on CPU the running sum of the profiler's allocation and
  free events in time order (``torch.profiler.profile(profile_memory=True)``), on CUDA
  ``torch.cuda.max_memory_allocated()`` minus the allocated bytes at the start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of ``t``'s storage, None for a tensor without one."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return s.data_ptr(), s.nbytes()


def saved_tensor_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor] = ()
                       ) -> dict[str, int]:
    """``{"activations", "params"}``: bytes of the distinct storages saved for backward by one
    ``forward()``, those of ``params`` apart (module docstring). The output of ``forward`` is
    dropped before returning."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None:
            saved[storage[0]] = storage[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"activations": sum(n for p, n in saved.items() if p not in param_ptrs),
            "params": sum(n for p, n in saved.items() if p in param_ptrs)}


def peak_live_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of live tensors during ``step()`` above those live at its start (module
    docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
