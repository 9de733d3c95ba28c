"""Process-group set-up for every entry point: torchrun, srun, or a plain `python` process.

`init()` finds the rank and world from the environment, starts the default process group (nccl with CUDA, gloo
without), splits it into model-parallel x data-parallel groups with fairscale, and seeds torch so that ranks of one
model-parallel group draw identical random numbers while data-parallel replicas differ. `teardown()` undoes all of it,
so a test can build several groups in one process.
"""

import contextlib
import ctypes
import datetime
import io
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    model_parallel_size: int
    model_parallel_rank: int
    data_parallel_size: int
    data_parallel_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames` prints it first:
    'gpu[07-09,12],cpu1' -> 'gpu07'; 'rack[1-2]-node[01-04]' -> 'rack1-node01'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level item (commas inside brackets do not count)
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end].strip()
    if not item or item.count("[") != item.count("]"):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], item)


def end_with_launcher() -> None:
    """Under torchrun: have the kernel SIGKILL this worker the moment its torchrun agent dies.

    torchrun starts each worker as the leader of a session of its own, so a kill -9 of the launcher's process group
    (a killed job or driver) leaves the workers running, re-parented to init, still writing into the run directory a
    rerun is using. PR_SET_PDEATHSIG ties each worker's life to the agent's. A worker already re-parented (its agent
    died before this call) exits at once. Only torchrun's workers themselves (session leaders) are bound; Linux only."""
    global _bound_to_launcher
    if _bound_to_launcher or "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    _bound_to_launcher = True
    if os.getsid(0) != os.getpid():  # a process started by a worker, or torchrun's agent itself: not a worker
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the request took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1
_bound_to_launcher = False
end_with_launcher()  # at import: before a worker does anything else


def _environment() -> tuple[int, int, int, Optional[str]]:
    """(rank, world_size, local_rank, init_method) from torchrun, srun, or nothing (a world of one)."""
    env = os.environ
    end_with_launcher()
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that sets the env:// variables)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    # srun with one task per process. Only srun sets SLURM_STEP_NUM_TASKS; an sbatch script (SLURM_PROCID=0 and
    # SLURM_NTASKS=N, but a single process) must not wait for peers that never come.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_PROCID" in env and tasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        master = env.get("MASTER_ADDR") or first_host(nodelist)
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        return int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), f"tcp://{master}:{port}"
    return 0, 1, 0, None


def global_rank() -> int:
    """This process's rank before any process group exists (0 for a plain python process)."""
    return _environment()[0]


def init(model_parallel_size: Optional[int] = None, seed: int = 1, backend: Optional[str] = None) -> DistInfo:
    """Start (or join) the process group and the model-parallel groups; the model-parallel size defaults to the world."""
    rank, world, local_rank, init_method = _environment()
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    # local_rank modulo the visible devices: under srun's per-task GPU binding each task sees only its own GPU
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Long jobs wait at barriers while slower replicas finish: allow hours, not the default 30 minutes.
        timeout = datetime.timedelta(minutes=float(os.environ.get("LLAMA_MP_TIMEOUT_MINUTES", "360")))
        if init_method is None:  # a plain python process: a world of one, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    mp = model_parallel_size or world
    if mp < 1 or world % mp:
        raise ValueError(f"model-parallel size {mp} must divide the world size {world}")
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines per call
        fs_init.initialize_model_parallel(mp)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, model_parallel_size=mp,
                    model_parallel_rank=fs_init.get_model_parallel_rank(), data_parallel_size=world // mp,
                    data_parallel_rank=fs_init.get_data_parallel_rank(), device=device)
    seed_everything(seed, info)
    return info


def seed_everything(seed: int, info: DistInfo) -> None:
    """Same seed across a model-parallel group (identical sampling on its ranks), distinct across data-parallel ranks."""
    torch.manual_seed(seed + info.data_parallel_rank)


def teardown() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


if __name__ == "__main__":  # used by scripts/launch.sh where `scontrol` is missing
    print(first_host(sys.argv[1]))
