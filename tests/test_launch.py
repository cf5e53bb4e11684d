"""launch/ scripts: command lines (dry runs) and real launches of a tiny all-reduce script.

Real launches: torchrun c10d with 2 "nodes" x 1 process on 127.0.0.1, Open MPI's mpirun (skipped
when mpirun or mpi4py is absent), and slurm.sbatch under a fake ``srun``. Every launch runs in
its own session and is killed as a whole if it outlives its deadline.
"""

import importlib.util
import os
import random
import re
import shutil
import socket
import subprocess
import textwrap

import pytest

from moe_parallel.distributed.init import parse_nodelist
from tests.helpers.proc_utils import launcher_free_env, run_sessions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("torchrun_single_node.sh", "torchrun_multi_node.sh", "mpirun.sh", "slurm.sbatch",
           "single_process.sh", "deepspeed.sh", "slurm_bench.sbatch")
LAUNCH_TIMEOUT_S = 150

ALLREDUCE_CHECK = """
    import os
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moe_parallel.distributed.init import init_distributed

    rank, world, local = init_distributed("gloo", timeout=timedelta(seconds=60))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    line = (f"RESULT rank={rank} world={world} local={local} sum={t.item():g} "
            f"args={' '.join(sys.argv[1:])}\\n")
    os.write(1, line.encode())  # one write(2) per line: ranks sharing a pipe never interleave
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def entry_dir(tmp_path_factory):
    """A directory holding the module ``allreduce_check`` that the scripts run (MODULE=...)."""
    d = tmp_path_factory.mktemp("entry")
    (d / "allreduce_check.py").write_text(textwrap.dedent(ALLREDUCE_CHECK))
    return d


def _env(entry_dir=None, **extra) -> dict:
    """This environment without any launcher's variables, plus ``extra`` (and the check entry
    point of ``entry_dir``)."""
    if entry_dir is not None:
        extra = {"PYTHONPATH": str(entry_dir), "MODULE": "allreduce_check", **extra}
    return launcher_free_env(**extra)


def _run_all(commands: list[tuple[list[str], dict]], timeout_s: float = LAUNCH_TIMEOUT_S
             ) -> list[tuple[int, str]]:
    return run_sessions(commands, timeout_s)


def _results(output: str) -> list[str]:
    return sorted(line for line in output.splitlines() if line.startswith("RESULT "))


def _expected(world: int, args: str, locals_=None) -> list[str]:
    total = world * (world + 1) // 2
    locals_ = locals_ or list(range(world))
    return sorted(f"RESULT rank={r} world={world} local={locals_[r]} sum={total} args={args}"
                  for r in range(world))


def _free_port(lo: int = 0, hi: int = 0) -> int:
    """A free TCP port (in [lo, hi) when given)."""
    for _ in range(200):
        port = random.randrange(lo, hi) if hi else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _script(name: str) -> str:
    return os.path.join(LAUNCH, name)


# ---- static checks and dry runs -----------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_and_are_executable(name):
    assert os.access(_script(name), os.X_OK)
    subprocess.run(["bash", "-n", _script(name)], check=True, timeout=30)


def _dry(name: str, *args: str, **env) -> str:
    proc = subprocess.run([_script(name), *args], env=_env(DRY_RUN=1, **env), cwd="/",
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.distributed
def test_dry_runs_print_the_commands():
    py = os.path.join(ROOT, ".venv", "bin", "python")
    py = py if os.access(py, os.X_OK) else ""
    out = _dry("torchrun_single_node.sh", "4", "--steps", "3", "a b")
    assert ("-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4 "
            "--max-restarts 0 -m moe_parallel.train --steps 3 a\\ b") in out
    assert out.startswith(f"+ env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 {py}")
    out = _dry("torchrun_multi_node.sh", "8", "--steps", "1", NNODES=2, NODE_RANK=1,
               RDZV_ENDPOINT="node0:29400", LOCAL_ADDR="10.0.0.2")
    assert ("--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 "
            "--rdzv-id moe_parallel --rdzv-conf join_timeout=600 --max-restarts 0 "
            "--local-addr 10.0.0.2 -m moe_parallel.train --steps 1") in out
    out = _dry("torchrun_multi_node.sh", "2", NNODES=2, NODE_RANK=1, RDZV_ENDPOINT="h:1",
               RDZV_BACKEND="static")
    assert "--rdzv-backend static" in out and "--node-rank 1" in out
    out = _dry("mpirun.sh", "4", "--steps", "2", HOSTFILE="hosts", MPIRUN_ARGS="--oversubscribe",
               MASTER_PORT=1234)
    assert "mpirun -np 4 --bind-to none -x PYTHONPATH" in out
    assert "--hostfile hosts -x MASTER_PORT" in out
    assert "--oversubscribe " in out and out.rstrip().endswith("-m moe_parallel.train --steps 2")
    out = _dry("slurm.sbatch", "--steps", "5", MODULE="other.entry")
    assert "srun --kill-on-bad-exit=1" in out and out.rstrip().endswith("-m other.entry --steps 5")
    out = _dry("deepspeed.sh", "4", "ds.json", "--ep", "2", MASTER_PORT=1234)
    assert ("-m deepspeed.launcher.runner --num_gpus 4 --master_port 1234 --module "
            "moe_parallel.train --deepspeed /ds.json --ep 2") in out  # CONFIG from the caller's cwd


@pytest.mark.distributed
@pytest.mark.parametrize("name, env, message", [
    ("torchrun_single_node.sh", {}, "usage"),
    ("deepspeed.sh", {}, "usage"),
    ("torchrun_multi_node.sh", {"RDZV_ENDPOINT": "h:1"}, "NNODES is not set"),
    ("torchrun_multi_node.sh", {"NNODES": 2}, "RDZV_ENDPOINT is not set"),
    ("torchrun_multi_node.sh", {"NNODES": 2, "RDZV_ENDPOINT": "h:1", "RDZV_BACKEND": "static"},
     "NODE_RANK is not set"),
])
def test_missing_arguments_are_reported(name, env, message):
    args = [] if name in ("torchrun_single_node.sh", "deepspeed.sh") else ["2"]
    proc = subprocess.run([_script(name), *args], env=_env(DRY_RUN=1, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr


# ---- SLURM nodelist parser ---------------------------------------------------------------------
def test_parse_nodelist():
    assert parse_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07",
                                                      "gpu5"]
    assert parse_nodelist("a1") == ["a1"]
    assert parse_nodelist("r[1-2]n[8-10]") == ["r1n8", "r1n9", "r1n10", "r2n8", "r2n9", "r2n10"]
    assert parse_nodelist("x[098-101]-ib,y") == ["x098-ib", "x099-ib", "x100-ib", "x101-ib", "y"]
    for bad in ("n[1-", "n]1[", "n[3-1]", "n[a]", "n[[1]]", ""):
        with pytest.raises(ValueError):
            parse_nodelist(bad)


# ---- real launches ------------------------------------------------------------------------
@pytest.mark.distributed
def test_torchrun_c10d_two_nodes_on_localhost(entry_dir):
    port = _free_port()
    commands = [([_script("torchrun_multi_node.sh"), "2", "hello"],
                 _env(entry_dir, NNODES=2, NODE_RANK=n, RDZV_ENDPOINT=f"127.0.0.1:{port}",
                      LOCAL_ADDR="127.0.0.1", RDZV_ID=f"test{port}", RDZV_TIMEOUT=60))
                for n in range(2)]
    results = _run_all(commands)
    for rc, out in results:
        assert rc == 0, out
    lines = sorted(line for _, out in results for line in _results(out))
    assert lines == _expected(4, "hello", locals_=[0, 1, 0, 1])


def _mpi_skip_reason():
    if shutil.which("mpirun") is None:
        return "mpirun not found: apt-get install -y openmpi-bin libopenmpi-dev"
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" not in version.stdout + version.stderr:
        return "mpirun is not Open MPI (launch/mpirun.sh targets Open MPI)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed: .venv/bin/pip install mpi4py (needs libopenmpi-dev)"
    return None


MPI_SKIP = _mpi_skip_reason()


@pytest.mark.distributed
@pytest.mark.skipif(MPI_SKIP is not None, reason=str(MPI_SKIP))
def test_mpirun_without_master_env_uses_mpi4py(entry_dir):
    [(rc, out)] = _run_all([([_script("mpirun.sh"), "4", "hi"],
                             _env(entry_dir, MPIRUN_ARGS="--oversubscribe"))])
    assert rc == 0, out
    assert _results(out) == _expected(4, "hi")


FAKE_SRUN = """\
#!/usr/bin/env bash
# Fake srun: runs the command SLURM_NTASKS times on this host with srun's per-task variables.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.distributed
def test_slurm_sbatch_under_a_fake_srun(entry_dir, tmp_path):
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    job_id = _free_port(20000, 30000) - 20000  # the port init_distributed derives from the job id
    env = _env(entry_dir, SLURM_NTASKS=2, SLURM_JOB_ID=job_id,
               SLURM_JOB_NODELIST="localhost,node[2-3]",
               PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    [(rc, out)] = _run_all([(["bash", _script("slurm.sbatch"), "s"], env)])
    assert rc == 0, out
    assert _results(out) == _expected(2, "s")


DEEPSPEED_SKIP = (None if importlib.util.find_spec("deepspeed") is not None else
                  "deepspeed not installed: pip install -e '.[deepspeed]' (DS_BUILD_OPS=0)")
DS_CONFIG = '{"zero_optimization": {"stage": 1}, "steps_per_print": 1000000}'


@pytest.mark.distributed
@pytest.mark.skipif(DEEPSPEED_SKIP is not None, reason=str(DEEPSPEED_SKIP))
def test_deepspeed_launcher_trains_under_the_engine(tmp_path):
    """launch/deepspeed.sh: 2 ranks (ep2) of moe_parallel.train under the engine; the launcher's
    --local_rank is accepted and every rank exits 0."""
    (tmp_path / "ds.json").write_text(DS_CONFIG)
    cmd = [_script("deepspeed.sh"), "2", str(tmp_path / "ds.json"), "--ep", "2", "--steps", "2",
           "--layers", "1", "--hidden", "16", "--ffn", "16", "--seq-len", "8",
           "--batch-size", "2", "--log-every", "1"]
    [(rc, out)] = _run_all([(cmd, _env(MASTER_PORT=_free_port(), OMP_NUM_THREADS=1))])
    assert rc == 0, out[-4000:]
    assert "2 process(es) tp=1 ep=2 etp=1 dp=2 edp=1" in out and "DeepSpeed ZeRO-1" in out, out
    assert re.search(r"^loss \d+\.\d+ -> \d+\.\d+ \(floor", out, re.M), out[-4000:]
    assert out.count("exits successfully") == 2, out[-4000:]
