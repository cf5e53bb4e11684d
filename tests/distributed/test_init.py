"""moe_parallel.distributed.init: launcher detection on fake environments, and one real 2-rank
gloo start."""

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_parallel.distributed import init as init_mod
from moe_parallel.distributed.init import LaunchEnv, detect_launch_env, init_distributed
from tests.helpers.proc_utils import free_port, launcher_free_env, spawn_bounded

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6",
           "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
SLURM = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123457",
         "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_LAUNCH_NODE_IPADDR": "10.9.9.9"}


# ---- detect_launch_env -------------------------------------------------------------------------
def test_torchrun():
    assert detect_launch_env(TORCHRUN) == LaunchEnv(3, 8, 1, "10.0.0.1", 29500, "torchrun")
    plain = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    assert detect_launch_env(plain).launcher == "env"


def test_openmpi_without_master_leaves_it_to_mpi():
    assert detect_launch_env(OPENMPI) == LaunchEnv(5, 6, 2, None, None, "openmpi")
    env = detect_launch_env({**OPENMPI, "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("h0", 1234)


def test_mpich():
    assert detect_launch_env(MPICH) == LaunchEnv(2, 4, 0, None, None, "mpich")
    alt = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "1"}
    assert detect_launch_env(alt).local_rank == 1


def test_slurm_master_is_first_host_of_nodelist_and_port_from_job_id():
    env = detect_launch_env(SLURM)
    assert env == LaunchEnv(9, 16, 1, "gpu07", 20000 + 123457 % 10000, "slurm")
    step = detect_launch_env({**SLURM, "SLURM_STEP_NODELIST": "gpu08"})
    assert step.master_addr == "gpu08"
    given = detect_launch_env({**SLURM, "MASTER_ADDR": "m", "MASTER_PORT": "4000"})
    assert (given.master_addr, given.master_port) == ("m", 4000)
    no_list = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert detect_launch_env(no_list).master_addr == "10.9.9.9"
    seen = []
    detect_launch_env(SLURM, expand_nodelist=lambda s: seen.append(s) or ["x"])
    assert seen == ["gpu[07-08],cpu1"]


def test_nothing_is_a_single_process():
    assert detect_launch_env({}) == LaunchEnv(0, 1, 0, None, None, "single")
    assert detect_launch_env({"PATH": "/bin", "SLURM_JOB_ID": "4"}).world_size == 1


def test_innermost_launcher_wins():
    # torchrun started per node by srun or mpirun: torchrun's variables describe the workers.
    assert detect_launch_env({**SLURM, **OPENMPI, **TORCHRUN}).launcher == "torchrun"
    assert detect_launch_env({**SLURM, **OPENMPI}).launcher == "openmpi"


@pytest.mark.parametrize("env, name", [
    ({**TORCHRUN, "RANK": "8"}, "RANK"),
    ({**TORCHRUN, "RANK": "x"}, "RANK"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_WORLD_SIZE"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK"),
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "6"}, "OMPI_COMM_WORLD_RANK"),
    ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "-1"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
    ({**MPICH, "PMI_SIZE": "two"}, "PMI_SIZE"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "MPI_LOCALRANKID"),
    ({**SLURM, "SLURM_PROCID": "16"}, "SLURM_PROCID"),
    ({**SLURM, "SLURM_LOCALID": "16"}, "SLURM_LOCALID"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS"),
    ({**SLURM, "SLURM_JOB_NODELIST": "gpu[07-"}, "nodelist"),
])
def test_inconsistent_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        detect_launch_env(env)


# ---- side-effect helpers -----------------------------------------------------------------------
def test_mpi_path_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes "from mpi4py import MPI" fail
    with pytest.raises(RuntimeError, match="pip install mpi4py.*MASTER_ADDR and MASTER_PORT"):
        init_mod._mpi_rendezvous(LaunchEnv(0, 2, 0, None, None, "openmpi"))


def test_cuda_device_is_the_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    init_mod._select_cuda_device(3)
    with pytest.raises(ValueError, match="local rank 4 has no GPU: only 4 visible"):
        init_mod._select_cuda_device(4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound per task
    init_mod._select_cuda_device(5)
    assert chosen == [3, 0]


def test_slurm_hostnames_uses_scontrol_when_present(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert init_mod.slurm_hostnames("n[1-2]") == ["n1", "n2"]  # no scontrol: the parser
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho from-scontrol-1\necho from-scontrol-2\n")
    fake.chmod(0o755)
    assert init_mod.slurm_hostnames("n[1-2]") == ["from-scontrol-1", "from-scontrol-2"]


def test_single_process_gets_a_one_rank_group(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             and not k.startswith(("OMPI_", "PMI_", "SLURM_", "TORCHELASTIC_"))}
    monkeypatch.setattr(os, "environ", clean)
    try:
        assert init_distributed(backend="gloo") == (0, 1, 0)
        t = torch.ones(2)
        dist.all_reduce(t)
        assert dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0]
        assert (clean["RANK"], clean["WORLD_SIZE"], clean["LOCAL_RANK"]) == ("0", "1", "0")
    finally:
        dist.destroy_process_group()


EXIT_SCRIPT = """
import atexit
import torch.distributed as dist
# registered first, so it runs after init_distributed's handler (atexit is last-in, first-out)
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
from moe_parallel import init_distributed
init_distributed("gloo")
print("initialized:", dist.is_initialized(), flush=True)
"""


@pytest.mark.distributed
def test_init_distributed_destroys_its_group_at_exit():
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], env=launcher_free_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["initialized: True", "initialized at exit: False"], \
        done.stdout


# ---- init_distributed: one real launch ---------------------------------------------------------
TIMEOUT_S = 4.0


def _init_worker(rank: int, port: int, start, peer_done) -> None:
    start.wait(60)  # imports done on both ranks: the short rendezvous timeout is not a race
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    got = init_distributed("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    assert got == (rank, 2, rank)
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 2
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == 3.0
    assert init_distributed() == (rank, 2, rank)  # idempotent
    if rank == 1:  # stay alive but never join the next collective: rank 0 must time out
        assert peer_done.wait(60), "rank 0 never reported back"
        return
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="[Tt]imed out"):
        dist.all_reduce(t)
    elapsed = time.monotonic() - start
    peer_done.set()
    assert TIMEOUT_S * 0.5 <= elapsed <= TIMEOUT_S + 20, elapsed


@pytest.mark.distributed
def test_init_distributed_two_gloo_ranks_and_timeout():
    ctx = mp.get_context("spawn")
    spawn_bounded(_init_worker, 2, (free_port(), ctx.Barrier(2), ctx.Event()), timeout_s=90)
