"""A training job survives a lost rank: killed, it restarts from its last complete checkpoint and
ends bitwise equal to a run that was never interrupted; stalled, it ends within --timeout-s.

The faults come from ``tests.helpers.fault_entry`` (the main job with a real SIGKILL of one rank
in the middle of a step, or inside the DCP write of a checkpoint, each once per fault directory).
A faulted job runs 8 float64 steps with a checkpoint every 2: its first attempt loses a rank in
step 3 (0-based; ``latest`` is step 2), its second resumes from step 2 and loses a rank while
writing step 4 (``step_00000004.tmp`` left behind), its third resumes from step 2 again and
finishes. Its final checkpoint (step 8) then equals the uninterrupted reference run's in every
entry: parameters, AdamW state, the loss curve, the data position, the schedule and every rank's
RNG states. The restarts come from torchrun (``--max-restarts 2``, 2 and 4 ranks) and, for
mpirun and SLURM (2 ranks, the kill inside the checkpoint write only), from the retry loop the
README gives around ``launch/mpirun.sh`` and ``launch/slurm.sbatch`` (SLURM under a fake
``srun`` that ends the other tasks when one fails, as ``--kill-on-bad-exit=1`` does).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_parallel.checkpoint import consolidate, latest_step, step_dir
from moe_parallel.checkpoint.convert import _read_all
from tests.helpers.proc_utils import ROOT, free_port, launcher_free_env, run_sessions

pytestmark = pytest.mark.distributed

STEPS, SAVE_EVERY, STEP_KILLED, SAVE_KILLED = 8, 2, 3, 4
TRAIN = ["--ep", "2", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--resume",
         "--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
         "--experts", "8", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
         "--log-every", "100", "--timeout-s", "60"]
# torchrun's shared rendezvous store keeps the previous attempt's keys: restarted gloo ranks
# can read a dead peer's address (pytorch/pytorch#135712); the README sets this too
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RUN_TIMEOUT_S = 240


def _env(**extra) -> dict:
    """No launcher's variables, one thread per rank, and CPU ranks (gloo) even on a GPU host."""
    return launcher_free_env(OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1, CUDA_VISIBLE_DEVICES="",
                             **extra)


def _torchrun(nproc: int, module: str, save_dir: Path, restarts: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "--max-restarts", str(restarts), "-m", module,
            *TRAIN, "--save-dir", str(save_dir)]


def _faults(fault_dir: Path, step_rank: int | None, save_rank: int) -> dict:
    """``fault_entry``'s variables: ``step_rank`` killed in step ``STEP_KILLED`` (unless
    ``None``), then ``save_rank`` inside the write of checkpoint ``SAVE_KILLED``."""
    fault_dir.mkdir()
    faults = {"FAULT_DIR": fault_dir, "FAULT_SAVE_RANK": save_rank,
              "FAULT_IN_SAVE_STEP": SAVE_KILLED}
    if step_rank is not None:
        faults.update(FAULT_STEP_RANK=step_rank, FAULT_AT_STEP=STEP_KILLED)
    return faults


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, tuple[Path, str]]:
    """Uninterrupted runs of the same command at 2 and 4 ranks (torchrun, the plain job):
    ranks -> (checkpoint root, output)."""
    base = tmp_path_factory.mktemp("reference")
    roots = {n: base / f"ranks{n}" for n in (2, 4)}
    results = run_sessions([(_torchrun(n, "moe_parallel.train", root), _env(**TORCHRUN_ENV))
                            for n, root in roots.items()], RUN_TIMEOUT_S)
    for (rc, out), n in zip(results, roots):
        assert rc == 0, f"reference run on {n} ranks failed:\n{out[-4000:]}"
        assert "resumed from" not in out
    return {n: (roots[n], out) for (_, out), n in zip(results, roots)}


def _state(root: Path, out: Path) -> dict:
    """Everything the final checkpoint under ``root`` holds: the consolidated model, optimizer
    state and ``extra`` (loss curve, data position, schedule), and each rank's RNG states."""
    state = consolidate(step_dir(root, STEPS), out)
    state.pop("manifest")
    state["rng"] = {k: v for k, v in _read_all(step_dir(root, STEPS)).items()
                    if k.startswith("rng.")}
    return state


def _assert_same(a, b, path: str = "") -> int:
    """``a`` and ``b`` are equal, every tensor bitwise (dtype, shape, values); returns the
    number of tensors compared."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, sorted(a.keys() ^ b.keys()))
        return sum(_assert_same(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(_assert_same(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype)
        assert torch.equal(a, b), (path, float((a.double() - b.double()).abs().max()))
        return 1
    assert a == b, (path, a, b)
    return 0


def _check_recovered(root: Path, fault_dir: Path, out: str, ref: tuple[Path, str],
                     tmp: Path, nproc: int, step_rank: int | None, save_rank: int) -> None:
    """The faulted run under ``root`` lost a rank in step ``STEP_KILLED`` (unless
    ``step_rank`` is ``None``) and one inside the write of checkpoint ``SAVE_KILLED``, resumed
    from step 2 after each, cleaned up the killed save, and ended bitwise equal to the
    reference ``ref``."""
    # the faults fired, each once, where they were meant to
    kills = 1 if step_rank is None else 2
    if step_rank is not None:
        assert f"FAULT step rank={step_rank} step={STEP_KILLED}" in out, out[-4000:]
    assert f"FAULT save rank={save_rank} step={SAVE_KILLED}" in out, out[-4000:]
    assert out.count("FAULT ") == kills, out[-4000:]
    assert (fault_dir / "fired_save").is_file()
    # the save was killed with its directory unfinished and `latest` on the previous one
    killed = (fault_dir / "fired_save").read_text()
    assert f"latest=2 root: latest step_00000002 step_{SAVE_KILLED:08d}.tmp" in killed, killed
    # one restart per kill, each resumed from the last complete checkpoint
    resumed = re.findall(r"^resumed from (\S+) at step (\d+)$", out, re.M)
    assert resumed == [(step_dir(root, 2), "2")] * kills, (resumed, out[-4000:])
    assert out.count(f"moe_parallel demo on cpu: {nproc} process(es)") == kills + 1
    # no leftover of the killed save; the final checkpoint is the newest
    assert latest_step(root) == STEPS
    assert sorted(p.name for p in root.iterdir()) == ["latest", step_dir("", 6),
                                                      step_dir("", STEPS)]
    # bitwise equal to the uninterrupted run: every tensor and value of the final checkpoint
    ref_root, ref_out = ref
    tmp.mkdir(exist_ok=True)
    got, want = _state(root, tmp / "faulted"), _state(ref_root, tmp / "reference")
    assert len(want["extra"]["history"]) == STEPS
    assert want["optim"]["state"]
    assert {k.split(".")[1] for k in want["rng"]} == {f"rank{r}" for r in range(nproc)}
    assert _assert_same(got, want) > 3 * len(want["model"])
    summary = re.compile(r"^loss \d+\.\d+ -> \d+\.\d+ .*$", re.M)
    assert summary.search(out)[0].split(",")[0] == summary.search(ref_out)[0].split(",")[0]


@pytest.mark.parametrize("nproc, step_rank, save_rank", [(2, 1, 0), (4, 2, 3)],
                         ids=["2ranks", "4ranks"])
def test_torchrun_restarts_after_lost_ranks_and_ends_bitwise(reference, tmp_path, nproc,
                                                             step_rank, save_rank):
    """torchrun --max-restarts 2: one rank SIGKILLed in step 3, then another inside the
    checkpoint write of step 4 (rank 0, DCP's coordinator and the committer, at 2 ranks)."""
    root, fault_dir = tmp_path / "ckpt", tmp_path / "faults"
    env = _env(**TORCHRUN_ENV, **_faults(fault_dir, step_rank, save_rank))
    [(rc, out)] = run_sessions([(_torchrun(nproc, "tests.helpers.fault_entry", root), env)],
                               RUN_TIMEOUT_S)
    assert rc == 0, out[-4000:]
    _check_recovered(root, fault_dir, out, reference[nproc], tmp_path, nproc, step_rank,
                     save_rank)


FAKE_SRUN = """\
#!/usr/bin/env bash
# Fake srun --kill-on-bad-exit=1: SLURM_NTASKS tasks on this host with srun's per-task
# variables; when one exits non-zero the others are killed and srun exits with its status.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
rc=0
for ((n = 0; n < SLURM_NTASKS; n++)); do
    wait -n; status=$?
    if ((status != 0)); then
        rc=$status
        kill -9 "${pids[@]}" 2>/dev/null
        break
    fi
done
wait
exit $rc
"""


def _retry_loop(launch: str, root: Path) -> list[str]:
    """The README's retry loop around a launch script: up to 3 attempts, each with --resume."""
    train = " ".join([*TRAIN, "--save-dir", str(root)])
    return ["bash", "-c", f'for attempt in 1 2 3; do {launch} {train} && exit 0; done; exit 1']


def _mpi_skip_reason() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not found: apt-get install -y openmpi-bin libopenmpi-dev"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed: .venv/bin/pip install mpi4py (needs libopenmpi-dev)"
    return None


def test_retry_loops_around_mpirun_and_slurm_resume_bitwise(reference, tmp_path):
    """launch/mpirun.sh (real Open MPI) and launch/slurm.sbatch (fake srun), 2 ranks each, in
    the README's retry loop: rank 0 killed inside the write of checkpoint 4, the next attempt
    resumes from step 2 and ends bitwise equal to the uninterrupted run (the kill in a step is
    left to the torchrun test: the launcher's part, ending the survivors, is the same)."""
    srun_dir = tmp_path / "bin"
    srun_dir.mkdir()
    (srun_dir / "srun").write_text(FAKE_SRUN)
    (srun_dir / "srun").chmod(0o755)
    launches = {"slurm": (f"bash {ROOT}/launch/slurm.sbatch",
                          {"PATH": f"{srun_dir}{os.pathsep}{os.environ['PATH']}",
                           "SLURM_NTASKS": 2, "SLURM_JOB_NODELIST": "localhost",
                           "SLURM_JOB_ID": free_port() % 10000})}  # port 20000 + id % 10000
    mpi_skip = _mpi_skip_reason()
    if mpi_skip is None:
        launches["mpirun"] = (f"{ROOT}/launch/mpirun.sh 2", {"MPIRUN_ARGS": "--oversubscribe"})
    commands, dirs = [], {}
    for name, (launch, extra) in launches.items():
        root, fault_dir = tmp_path / f"{name}_ckpt", tmp_path / f"{name}_faults"
        dirs[name] = root, fault_dir
        env = _env(MODULE="tests.helpers.fault_entry", **extra,
                   **_faults(fault_dir, step_rank=None, save_rank=0))
        commands.append((_retry_loop(launch, root), env))
    results = run_sessions(commands, RUN_TIMEOUT_S)
    for name, (rc, out) in zip(launches, results):
        assert rc == 0, f"{name}:\n{out[-4000:]}"
        root, fault_dir = dirs[name]
        _check_recovered(root, fault_dir, out, reference[2], tmp_path / name, 2, None, 0)
    if mpi_skip is not None:
        pytest.skip(f"the SLURM loop passed; mpirun not run: {mpi_skip}")


STALL_TIMEOUT_S = 15  # above a slow start on a loaded machine: the rendezvous has it too


def test_a_stalled_rank_ends_the_torchrun_job_within_the_timeout(tmp_path):
    """A rank that stops answering (alive, asleep for 600 s in step 2) makes its peer's next
    collective raise after --timeout-s; torchrun's agent then ends the stalled rank and the job
    exits non-zero within the timeout (plus the time to end it), not after the stall."""
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    cmd = _torchrun(2, "tests.helpers.fault_entry", tmp_path / "ckpt", restarts=0)
    cmd[cmd.index("--timeout-s") + 1] = str(STALL_TIMEOUT_S)
    env = _env(**TORCHRUN_ENV, FAULT_DIR=fault_dir, FAULT_STALL_RANK=1, FAULT_STALL_AT_STEP=2,
               FAULT_STALL_S=600)
    [(rc, out)] = run_sessions([(cmd, env)], RUN_TIMEOUT_S)
    ended = time.time()
    assert rc != 0, out[-4000:]
    assert "FAULT stall rank=1 step=2" in out, out[-4000:]
    stalled = float(re.search(r"at=(\S+)", (fault_dir / "fired_stall").read_text())[1])
    assert ended - stalled < STALL_TIMEOUT_S + 30, ended - stalled
    assert f"Timed out waiting {STALL_TIMEOUT_S * 1000}ms" in out, out[-4000:]  # rank 0's error
    # the stalled rank was ended by torchrun's agent (SIGTERM), not by its own stall
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -15", out), out[-4000:]
