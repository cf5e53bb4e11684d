"""``moe_parallel.train`` with faults injected, for the fault-tolerance tests.

Run as the launcher's module (``torchrun ... -m tests.helpers.fault_entry <train flags>``, or
``MODULE=tests.helpers.fault_entry launch/mpirun.sh ...``) from the repository root. The
environment chooses the faults; each one fires once per ``FAULT_DIR`` (a marker file written
just before it fires), so the attempt that a launcher or a retry loop starts next runs clean:

* ``FAULT_STEP_RANK`` / ``FAULT_AT_STEP``: that rank SIGKILLs itself in the middle of step
  ``FAULT_AT_STEP`` (0-based: after its forward and backward, before the optimizer step's
  gradient-norm all-reduce);
* ``FAULT_SAVE_RANK`` / ``FAULT_IN_SAVE_STEP``: that rank SIGKILLs itself inside the DCP write of
  the checkpoint of step ``FAULT_IN_SAVE_STEP`` (after its own files are written, before the
  checkpoint's metadata and commit; the marker holds the step ``latest`` names and the
  checkpoint root's entries at that moment);
* ``FAULT_STALL_RANK`` / ``FAULT_STALL_AT_STEP``: that rank sleeps ``FAULT_STALL_S`` seconds
  (default 600) in the middle of that step, alive but silent.

Every fault prints ``FAULT <kind> rank=<r> step=<s>`` before it fires; its marker
``FAULT_DIR/fired_<kind>`` holds the rank, the step and the time (``at=``, ``time.time()``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

import moe_parallel.train.step as train_step_module
from moe_parallel.checkpoint import latest_step
from moe_parallel.train import main

_SAVE_DIR = re.compile(r"step_(\d+)\.tmp$")
_STEP_VAR = {"STEP": "FAULT_AT_STEP", "SAVE": "FAULT_IN_SAVE_STEP", "STALL": "FAULT_STALL_AT_STEP"}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wanted(kind: str) -> int | None:
    """The step of fault ``kind`` when it is set for this rank and has not fired yet."""
    rank, step = os.environ.get(f"FAULT_{kind}_RANK"), os.environ.get(_STEP_VAR[kind])
    if rank is None or step is None or int(rank) != _rank():
        return None
    if os.path.exists(_marker(kind)):
        return None
    return int(step)


def _marker(kind: str) -> str:
    return os.path.join(os.environ["FAULT_DIR"], f"fired_{kind.lower()}")


def _fire(kind: str, step: int, note: str = "") -> None:
    """Record that fault ``kind`` fired (durably, with ``note``), say so, then kill or stall
    this rank."""
    fd = os.open(_marker(kind), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, f"rank={_rank()} step={step} at={time.time():.3f} {note}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.write(1, f"FAULT {kind.lower()} rank={_rank()} step={step}\n".encode())
    if kind == "STALL":
        time.sleep(float(os.environ.get("FAULT_STALL_S", "600")))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _steps_done(opt) -> int:
    """Optimizer steps taken so far (AdamW's per-parameter step count; 0 before the first)."""
    for state in opt.state.values():
        return int(state["step"])
    return 0


def _install() -> None:
    optimizer_step = train_step_module.optimizer_step

    def faulty_optimizer_step(model, opt, ps, clip):
        step = _steps_done(opt)  # the step now running, 0-based
        for kind in ("STEP", "STALL"):
            if _wanted(kind) == step:
                _fire(kind, step)
        return optimizer_step(model, opt, ps, clip)

    write_data = FileSystemWriter.write_data

    def faulty_write_data(self, plan, planner):
        future = write_data(self, plan, planner)  # this rank's files are written
        match = _SAVE_DIR.search(os.fspath(self.path))
        if match and _wanted("SAVE") == int(match.group(1)):
            root = os.path.dirname(os.path.abspath(os.fspath(self.path)))
            _fire("SAVE", int(match.group(1)),
                  f"latest={latest_step(root)} root: {' '.join(sorted(os.listdir(root)))}")
        return future

    train_step_module.optimizer_step = faulty_optimizer_step
    FileSystemWriter.write_data = faulty_write_data


if __name__ == "__main__":
    _install()
    main(sys.argv[1:])
