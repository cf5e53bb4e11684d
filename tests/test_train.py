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


@pytest.mark.distributed
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


@pytest.mark.distributed
@pytest.mark.parametrize("flag", ["--ep", "--tp", "--etp"])
def test_parallel_flags_on_one_process_are_refused(flag):
    out = _run("--steps", "1", flag, "2")
    assert out.returncode != 0
    assert f"{flag} 2" in out.stderr and "single process" in out.stderr, out.stderr[-2000:]


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_progress_without_terminal_prints_plain_lines():
    """stdout and stderr captured (not terminals): no carriage-return bar frames, one plain
    line every ceil(20 / 16) = 2 steps, the last at step 20."""
    out = _run("--steps", "20", "--layers", "1", "--hidden", "16", "--ffn", "16",
               "--seq-len", "8", "--batch-size", "2", "--log-every", "100")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stdout and "\r" not in out.stderr
    done = re.findall(r"^train (\d+)/20  loss \d+\.\d+  tok/s [\d,]+  elapsed", out.stdout, re.M)
    assert done == [str(d) for d in range(2, 21, 2)], out.stdout


def test_progress_every_sets_the_plain_line_period(capsys):
    from moe_parallel.train.progress import Progress

    progress = Progress(start=3, total=20, enabled=True, every=7, live=False)
    for done in range(4, 21):
        progress.update(done, loss=1.0, tok_s=10.0)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["7/20", "14/20", "20/20"]
    silent = Progress(start=0, total=20, enabled=False, live=False)
    silent.update(20, loss=1.0, tok_s=10.0)
    assert capsys.readouterr().out == ""


def _refusal(capsys, *flags: str) -> str:
    """argparse's error for ``flags`` (exit status 2), before any process group or model."""
    with pytest.raises(SystemExit) as exc:
        train._parse(list(flags))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--hidden", "30", "--heads", "4"], "--hidden 30 is not divisible by --heads 4"),
    (["--hf-model", "/missing/dir"], "--hf-model /missing/dir: no such directory"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "10", "--tp", "4"], "--seq-len 10 must be divisible by --tp 4"),
])
def test_bad_flags_are_refused_naming_the_flag(capsys, flags, message):
    assert message in _refusal(capsys, *flags)


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "9"], ("--top-k", "--experts")),
    (["--overlap-chunks", "2", "--max-rows-factor", "1.5"],
     ("--overlap-chunks", "--max-rows-factor")),
    (["--capacity-factor", "0.5", "--dynamic-capacity"], ("--capacity-factor",)),
])
def test_layer_config_errors_name_the_flags(capsys, flags, named):
    """MoEConfig's rules, with each field the flags set named by its flag."""
    err = _refusal(capsys, *flags)
    assert all(f in err for f in named), err
    assert not re.search(r"\b(top_k|num_experts|overlap_chunks|max_rows_factor|capacity_factor)\b",
                         err), err


def test_hf_model_without_config_json_is_refused(capsys, tmp_path):
    err = _refusal(capsys, "--hf-model", str(tmp_path))
    assert f"--hf-model {tmp_path}: the directory has no config.json" in err


@pytest.mark.parametrize("flags, world, message", [
    (["--experts", "6", "--ep", "4"], 8, "--experts 6 is not divisible by --ep 4"),
    (["--ffn", "10", "--ep", "2", "--etp", "4"], 8, "--ffn 10 is not divisible by --etp 4"),
    (["--tp", "3", "--seq-len", "66"], 4, "--tp 3 does not divide the world size 4"),
    (["--ep", "4", "--etp", "2"], 4, "--ep 4 x --etp 2 = 8 does not divide the world size 4"),
    (["--dp", "4", "--tp", "2"], 4, "--dp 4 does not match world 4 / tp 2 = 2"),
])
def test_layouts_the_world_cannot_hold_are_refused(flags, world, message):
    args = train._parse(flags)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_world(args, world)


@pytest.mark.parametrize("mode", ["experts", "optimizer"])
def test_shard_with_deepspeed_is_refused(mode, capsys):
    with pytest.raises(SystemExit) as exc:
        train._parse(["--deepspeed", "ds.json", "--shard", mode])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--shard {mode} is not used with --deepspeed" in err and "drop --shard" in err


def test_shard_takes_its_modes_only(capsys):
    assert train._parse([]).shard == "none"
    with pytest.raises(SystemExit):
        train._parse(["--shard", "weights"])
    assert "invalid choice: 'weights'" in capsys.readouterr().err


@pytest.mark.distributed
def test_recompute_flag_reaches_every_layer_and_changes_no_loss():
    """--recompute sets MoEConfig.recompute; the float64 losses of 2 steps print the same
    digits in every mode (the modes agree to 1e-12)."""
    args = train._parser().parse_args(["--recompute", "experts"])
    assert train.build_config(args).recompute == "experts"
    losses = {}
    for mode in ("none", "experts"):
        out = _run("--steps", "2", "--layers", "1", "--log-every", "1", "--dtype", "float64",
                   "--recompute", mode)
        assert out.returncode == 0, out.stderr[-2000:]
        losses[mode] = re.findall(r"step\s+\d+\s+loss (\d+\.\d+)", out.stdout)
        assert len(losses[mode]) == 2, out.stdout
    assert losses["experts"] == losses["none"]
