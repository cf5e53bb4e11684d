"""Shared test setup.

* The repository root is importable however pytest is started (tests import ``tests.helpers``).
* Markers (registered in pyproject.toml): ``distributed`` marks a test that spawns processes
  (gloo ranks, launchers, subprocesses), so ``pytest -m "not distributed"`` is the fast inner
  loop; a test that spawns without it fails, naming the marker (``helpers.spawn_guard``).
  ``cuda`` marks a test that needs a CUDA device; it is skipped where there is none.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import spawn_guard  # noqa: E402

spawn_guard.install()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    spawn_guard.enter(item.nodeid, item.get_closest_marker("distributed") is not None)
