"""Process bootstrap: find this process's place in the job and initialise ``torch.distributed``.

Two layers, so that the logic can be tested without launching anything:

* :func:`detect_launch_env` is pure: from an environment mapping it returns a :class:`LaunchEnv`
  (rank, world size, local rank, master address/port, launcher name) or raises ``ValueError``
  naming the offending variable.
* :func:`init_distributed` does the side effects: MPI rendezvous when needed, CUDA device
  selection, ``init_process_group`` with a timeout (a lost rank becomes an error, not a hang).

Launchers recognised, innermost first (torchrun started by srun is "torchrun", not "slurm"):

============  ==========================================  ======================================
launcher      rank / world size / local rank               master address and port
============  ==========================================  ======================================
torchrun/env  RANK / WORLD_SIZE / LOCAL_RANK               MASTER_ADDR, MASTER_PORT (required)
openmpi       OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK   MASTER_ADDR/PORT, else via mpi4py
mpich         PMI_RANK / PMI_SIZE / MPI_LOCALRANKID        MASTER_ADDR/PORT, else via mpi4py
slurm         SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID  MASTER_ADDR, else first host of the
                                                           step/job nodelist, else
                                                           SLURM_LAUNCH_NODE_IPADDR; MASTER_PORT,
                                                           else 20000 + SLURM_JOB_ID % 10000
single        nothing set: one process, world size 1       none (an in-memory store)
============  ==========================================  ======================================
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=10)
_job_timeout: Optional[timedelta] = None  # what init_distributed gave the default group
_exit_hook = False  # _destroy_at_exit is registered


def job_timeout() -> Optional[timedelta]:
    """The collective timeout ``init_distributed`` gave the default group (``None`` when it did
    not create it). ``ParallelState.build`` gives every group it creates the same timeout, since
    ``dist.new_group`` does not inherit it."""
    return _job_timeout
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment.

    ``master_addr``/``master_port`` are ``None`` when the launcher did not provide them (MPI
    without MASTER_ADDR/MASTER_PORT: :func:`init_distributed` then agrees on them over MPI; or a
    single process, which needs none).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str


# ---- pure parsing ----------------------------------------------------------------------------
def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: tuple[str, ...], what: str) -> int:
    """The integer value of the first of ``names`` that is set; ValueError naming all if none."""
    for name in names:
        if name in environ:
            return _int(environ, name)
    raise ValueError(f"{what} is not set: expected one of {', '.join(names)}")


def _port(environ: Mapping[str, str], name: str = "MASTER_PORT") -> Optional[int]:
    if name not in environ:
        return None
    port = _int(environ, name)
    if not 0 < port < 65536:
        raise ValueError(f"{name}={port} is not a TCP port (1..65535)")
    return port


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside square brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM nodelist {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM nodelist {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(body: str, nodelist: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]`` (zero padding kept from the lower bound)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in SLURM nodelist {nodelist!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM nodelist {nodelist!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list syntax, e.g. ``"node[01-03,07],gpu5"`` ->
    ``["node01", "node02", "node03", "node07", "gpu5"]``; several bracket groups in one name
    (``"r[1-2]n[1-2]"``) expand as a product. ValueError on malformed input."""
    hosts: list[str] = []
    for term in _split_top_level(nodelist):
        pieces = re.split(r"(\[[^\[\]]*\])", term)
        choices = [
            _expand_range_set(p[1:-1], nodelist) if p.startswith("[") else [p]
            for p in pieces if p
        ]
        if any("[" in c or "]" in c for opts in choices for c in opts):
            raise ValueError(f"nested or unbalanced brackets in SLURM nodelist {nodelist!r}")
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {nodelist!r}")
    return hosts


def _slurm_master_addr(environ: Mapping[str, str],
                       expand_nodelist: Callable[[str], list[str]]) -> Optional[str]:
    """MASTER_ADDR, else the first host of the step/job nodelist (where SLURM_PROCID 0 runs),
    else SLURM_LAUNCH_NODE_IPADDR (the node srun was started on, which may be a login node)."""
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return expand_nodelist(environ[name])[0]
    return environ.get("SLURM_LAUNCH_NODE_IPADDR") or None


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    port = _port(environ)
    if port is not None:
        return port
    job_id = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _check(env: LaunchEnv, names: tuple[str, str, str]) -> LaunchEnv:
    """Consistency of rank, world size and local rank; errors name the variables."""
    rank_name, size_name, local_name = names
    if env.world_size < 1:
        raise ValueError(f"{size_name}={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(
            f"{rank_name}={env.rank} is outside [0, {size_name}={env.world_size})"
        )
    if not 0 <= env.local_rank < env.world_size:
        raise ValueError(
            f"{local_name}={env.local_rank} is outside [0, {size_name}={env.world_size})"
        )
    return env


def _torchrun_env(env: Mapping[str, str]) -> LaunchEnv:
    """torchrun or a plain environment: RANK / WORLD_SIZE / LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT required when WORLD_SIZE > 1, LOCAL_RANK below LOCAL_WORLD_SIZE when set."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    for name in names:
        if name not in env:
            raise ValueError(f"{name} is not set (RANK/WORLD_SIZE/LOCAL_RANK go together)")
    rank, world, local = (_int(env, n) for n in names)
    addr, port = env.get("MASTER_ADDR") or None, _port(env)
    if world > 1 and (addr is None or port is None):
        missing = "MASTER_ADDR" if addr is None else "MASTER_PORT"
        raise ValueError(f"{missing} is not set (needed with WORLD_SIZE={world})")
    if "LOCAL_WORLD_SIZE" in env and local >= _int(env, "LOCAL_WORLD_SIZE"):
        raise ValueError(
            f"LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}"
        )
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    return _check(LaunchEnv(rank, world, local, addr, port, launcher), names)


def _openmpi_env(env: Mapping[str, str]) -> LaunchEnv:
    """Open MPI: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (all three required)."""
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
    for name in names:
        if name not in env:
            raise ValueError(f"{name} is not set (Open MPI sets all three)")
    rank, world, local = (_int(env, n) for n in names)
    return _check(LaunchEnv(rank, world, local, env.get("MASTER_ADDR") or None, _port(env),
                            "openmpi"), names)


def _mpich_env(env: Mapping[str, str]) -> LaunchEnv:
    """MPICH (PMI): PMI_RANK and PMI_SIZE, the local rank from MPI_LOCALRANKID or
    PMI_LOCAL_RANK."""
    for name in ("PMI_RANK", "PMI_SIZE"):
        if name not in env:
            raise ValueError(f"{name} is not set (PMI_RANK and PMI_SIZE go together)")
    local_names = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    local = _first_int(env, local_names, "the MPICH local rank")
    local_name = next(n for n in local_names if n in env)
    return _check(LaunchEnv(_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), local,
                            env.get("MASTER_ADDR") or None, _port(env), "mpich"),
                  ("PMI_RANK", "PMI_SIZE", local_name))


def _slurm_env(env: Mapping[str, str],
               expand_nodelist: Callable[[str], list[str]]) -> LaunchEnv:
    """SLURM (srun): SLURM_PROCID / SLURM_NTASKS (or SLURM_NPROCS) / SLURM_LOCALID; with more
    than one task the master address and port of ``_slurm_master_addr`` and
    ``_slurm_master_port``."""
    size_names = ("SLURM_NTASKS", "SLURM_NPROCS")
    world = _first_int(env, size_names, "the SLURM task count")
    size_name = next(n for n in size_names if n in env)
    if "SLURM_LOCALID" not in env:
        raise ValueError("SLURM_LOCALID is not set (srun sets it with SLURM_PROCID)")
    rank, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    addr = _slurm_master_addr(env, expand_nodelist) if world > 1 else None
    if world > 1 and addr is None:
        raise ValueError("no SLURM master address: set MASTER_ADDR or SLURM_JOB_NODELIST")
    port = _slurm_master_port(env) if world > 1 else _port(env)
    return _check(LaunchEnv(rank, world, local, addr, port, "slurm"),
                  ("SLURM_PROCID", size_name, "SLURM_LOCALID"))


def detect_launch_env(environ: Optional[Mapping[str, str]] = None, *,
                      expand_nodelist: Callable[[str], list[str]] = parse_nodelist
                      ) -> LaunchEnv:
    """Read rank, world size, local rank and master address/port from a launcher's environment.

    Pure: reads only ``environ`` (default ``os.environ``) and calls ``expand_nodelist`` for SLURM.
    With no launcher variables the result is a single process (rank 0 of 1). Missing partner
    variables, non-integers, ranks outside the world and bad ports raise ``ValueError`` naming
    the variable. See the module docstring for the variables and their precedence.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun_env(env)
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return _openmpi_env(env)
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return _mpich_env(env)
    if "SLURM_PROCID" in env:
        return _slurm_env(env, expand_nodelist)
    return LaunchEnv(0, 1, 0, None, None, "single")


# ---- side effects ----------------------------------------------------------------------------
def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a SLURM nodelist: ``scontrol show hostnames`` when available, else
    :func:`parse_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return parse_nodelist(nodelist)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(env: LaunchEnv) -> LaunchEnv:
    """Fill a missing master address/port from rank 0 over MPI (mpi4py, imported lazily).

    Rank 0 picks a free port; the address is 127.0.0.1 when every rank shares rank 0's host,
    else rank 0's host name.
    """
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            f"launched by {env.launcher} without MASTER_ADDR/MASTER_PORT: rank 0 shares them over "
            "MPI, which needs mpi4py (pip install mpi4py; it builds against the MPI on PATH). "
            "Alternatively export MASTER_ADDR and MASTER_PORT to every rank (mpirun -x ...)."
        ) from e
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise ValueError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the environment says "
            f"{env.rank} of {env.world_size}"
        )
    hosts = comm.allgather(socket.gethostname())
    proposal = None
    if env.rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
        proposal = (env.master_addr or addr, env.master_port or _free_port())
    addr, port = comm.bcast(proposal, root=0)
    return LaunchEnv(env.rank, env.world_size, env.local_rank, addr, port, env.launcher)


def _select_cuda_device(local_rank: int) -> None:
    """Use GPU ``local_rank``; with one visible GPU (per-task binding) use it whatever the rank."""
    count = torch.cuda.device_count()
    if local_rank < count:
        torch.cuda.set_device(local_rank)
    elif count == 1:
        torch.cuda.set_device(0)
    else:
        raise ValueError(f"local rank {local_rank} has no GPU: only {count} visible")


def init_distributed(backend: Optional[str] = None, timeout: timedelta = DEFAULT_TIMEOUT
                     ) -> tuple[int, int, int]:
    """Initialise the default process group from the launcher's environment.

    Returns ``(rank, world_size, local_rank)``. Backend: ``backend``, else ``"nccl"`` when CUDA is
    available, else ``"gloo"``; with CUDA the current device becomes the local rank's GPU.
    ``timeout`` goes to ``init_process_group``: the rendezvous and every collective that waits
    longer on a lost rank raise instead of hanging; ``ParallelState.build`` gives it to every
    group it creates (``job_timeout()``). A single process (no launcher) gets a
    one-rank group on an in-memory store. RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are exported (if unset) for libraries that read them. If the default group
    already exists nothing is re-initialised and its rank and size are returned.

    A group this call creates is destroyed at interpreter exit (``destroy_process_group``, an
    ``atexit`` handler; a no-op if the program destroyed it): left to interpreter finalisation,
    gloo's worker threads can release tensors after Python is gone and abort the process.
    """
    global _job_timeout
    env = detect_launch_env(os.environ, expand_nodelist=slurm_hostnames)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), env.local_rank
    if env.world_size > 1 and (env.master_addr is None or env.master_port is None):
        env = _mpi_rendezvous(env)
    if torch.cuda.is_available():
        _select_cuda_device(env.local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")

    exported = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
                "MASTER_ADDR": env.master_addr, "MASTER_PORT": env.master_port}
    for name, value in exported.items():
        if value is not None:
            os.environ.setdefault(name, str(value))

    if env.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    _job_timeout = timeout
    destroy_groups_at_exit()
    return env.rank, env.world_size, env.local_rank


def destroy_groups_at_exit() -> None:
    """Register (once per process) an ``atexit`` handler that destroys every process group
    still alive (``destroy_process_group()``; a no-op when the program destroyed them).
    Left to interpreter finalisation, gloo's worker threads can release tensors after Python
    is gone, and the process aborts ("terminate called without an active exception").
    ``init_distributed`` and ``ParallelState.build`` call it."""
    global _exit_hook
    if not _exit_hook:
        atexit.register(_destroy_at_exit)
        _exit_hook = True


def _destroy_at_exit() -> None:
    """Destroy every process group still alive while the interpreter can still run their
    teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
