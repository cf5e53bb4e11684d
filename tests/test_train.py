"""moe_parallel.train on one process: its flags, refusals and summary line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from moe_parallel import train


def _run(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moe_parallel.train", *flags], env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_flag_has_help_and_shows_its_default():
    parser = train._parser()
    flags = [a for a in parser._actions if a.option_strings != ["-h", "--help"]]
    assert len(flags) > 20
    assert [a.dest for a in flags if not a.help] == []
    text = parser.format_help()
    assert "(default: 150)" in text and "(default: alltoall)" in text


def test_one_step_summary_is_that_step_s_loss():
    out = _run("--steps", "1", "--layers", "1", "--log-every", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    step = re.search(r"step\s+0\s+loss (\d+\.\d+).*\(max/mean (\d+\.\d+)\)", out.stdout)
    summary = re.search(r"^loss (\d+\.\d+) -> (\d+\.\d+) \(floor", out.stdout, re.M)
    assert step and summary, out.stdout
    loss = float(step.group(1))
    assert loss > 3.0  # about log(64) = 4.16 before any learning
    assert float(summary.group(1)) == pytest.approx(loss, abs=1e-3)
    assert float(summary.group(2)) == pytest.approx(loss, abs=1e-3)
    assert float(step.group(2)) >= 1.0  # imbalance max/mean load


@pytest.mark.parametrize("flag", ["--ep", "--tp", "--etp"])
def test_parallel_flags_on_one_process_are_refused(flag):
    out = _run("--steps", "1", flag, "2")
    assert out.returncode != 0
    assert f"{flag} 2" in out.stderr and "single process" in out.stderr, out.stderr[-2000:]


def test_zero_steps_is_refused():
    out = _run("--steps", "0")
    assert out.returncode == 2 and "--steps must be >= 1" in out.stderr
