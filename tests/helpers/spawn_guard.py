"""The ``distributed`` marker, enforced: a test that starts a process must carry it.

``install()`` wraps ``subprocess.Popen`` and ``multiprocessing``'s ``Process.start``; a start
whose nearest caller outside the standard process machinery is test code (a ``tests.`` module)
raises ``RuntimeError`` during a test not marked ``distributed``. Processes that libraries start
on their own (compiler probes and the like) are not the test's and pass. ``check(what)`` is the
same verdict for work handed to processes that already run (``dist_harness`` pools).
"""

from __future__ import annotations

import multiprocessing.process
import subprocess
import sys

_current = {"test": None, "distributed": True}  # outside a test (collection): allowed
_MACHINERY = ("subprocess", "multiprocessing", "torch.multiprocessing", "concurrent.futures",
              "tests.helpers.spawn_guard")


def enter(test: str, distributed: bool) -> None:
    """The test about to run, and whether it is marked ``distributed``."""
    _current.update(test=test, distributed=distributed)


def check(what: str) -> None:
    """Raise unless the current test may start processes (or no test runs)."""
    if not _current["distributed"]:
        raise RuntimeError(
            f"{_current['test']} {what} but is not marked distributed: add "
            "@pytest.mark.distributed (or pytestmark = pytest.mark.distributed in its module)"
        )


def _caller_is_test_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not any(name == m or name.startswith(m + ".") for m in _MACHINERY):
            return name.startswith("tests.") or name.startswith("test_")
        frame = frame.f_back
    return False


def install() -> None:
    """Wrap the process starters (once)."""
    if getattr(subprocess.Popen, "_spawn_guarded", False):
        return
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def guarded_popen_init(self, *args, **kwargs):
        if _caller_is_test_code():
            check("starts a subprocess")
        popen_init(self, *args, **kwargs)

    def guarded_start(self):
        if _caller_is_test_code():
            check("starts a process")
        process_start(self)

    subprocess.Popen.__init__ = guarded_popen_init
    subprocess.Popen._spawn_guarded = True
    multiprocessing.process.BaseProcess.start = guarded_start
