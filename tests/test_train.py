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


def test_dynamic_routing_flags_reach_every_layer():
    args = ["--steps", "6", "--layers", "2", "--hidden", "16", "--ffn", "16", "--seq-len", "8",
            "--batch-size", "2", "--top-k", "4", "--top-p", "0.3", "--capacity-factor", "1.0",
            "--drop-policy", "k_major", "--dynamic-capacity", "--target-drop-rate", "0.001",
            "--capacity-update-rate", "0.2", "--dynamic-loss-coeff", "0.01", "--log-every", "5"]
    out = train.main(args)
    cfgs = [m.config for m in out["model"].moe_layers()]
    assert all(c.top_p == 0.3 and c.drop_policy == "k_major" and c.dynamic_capacity
               and c.dynamic_loss_coeff == 0.01 and c.capacity_update_rate == 0.2
               for c in cfgs)
    assert len(out["experts_per_token"]) == len(out["drop_rate"]) == 6
    assert all(1.0 <= k <= 4.0 for k in out["experts_per_token"])
    factors = out["capacity_factor"]  # per step, every layer's factor after that step
    assert all(1.0 <= f <= 4.0 for step in factors for f in step)
    if out["drop_rate"][0] > 0.001:  # a layer that dropped more than the target raised its own
        assert max(factors[0]) == pytest.approx(1.2)
    assert len({f for step in factors for f in step}) > 1 and out["tokens_per_s"] > 0
