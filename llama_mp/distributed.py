"""Process-group set-up for every entry point: torchrun, srun, or a plain `python` process.

`init()` finds the rank and world from the environment, starts the default process group (nccl with CUDA, gloo
without), splits it into model-parallel x data-parallel groups with fairscale, and seeds torch so that ranks of one
model-parallel group draw identical random numbers while data-parallel replicas differ. `teardown()` undoes all of it,
so a test can build several groups in one process.
"""

import contextlib
import datetime
import io
import os
import re
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
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (what `scontrol show hostnames` prints first)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _environment() -> tuple[int, int, int, Optional[str]]:
    """(rank, world_size, local_rank, init_method) from torchrun, srun, or nothing (a world of one)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that sets the env:// variables)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun with one task per process
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        master = env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"])
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return rank, world, int(env.get("SLURM_LOCALID", 0)), f"tcp://{master}:{port}"
    return 0, 1, 0, None


def init(model_parallel_size: Optional[int] = None, seed: int = 1, backend: Optional[str] = None) -> DistInfo:
    """Start (or join) the process group and the model-parallel groups; the model-parallel size defaults to the world."""
    rank, world, local_rank, init_method = _environment()
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
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
    import sys

    print(first_host(sys.argv[1]))
