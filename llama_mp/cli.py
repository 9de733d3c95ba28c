"""What every command-line entry point shares: one-line errors for bad input, and rank-0 printing."""

import os
import sys
from typing import Callable

import torch.distributed as dist

from llama_mp import distributed


def run(main: Callable[[], None]) -> None:
    """Run `main`; bad input (a ValueError/OSError raised with a message naming the file) exits 2 with one line.

    Set LLAMA_MP_DEBUG=1 to get the full traceback instead.
    """
    try:
        main()
    except (ValueError, OSError, KeyError) as err:
        if os.environ.get("LLAMA_MP_DEBUG"):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"error: {err}" if rank == 0 else f"error (rank {rank}): {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.teardown()


def log(*args, **kwargs) -> None:
    """print on global rank 0 only, flushed (so that srun/torchrun logs interleave sensibly)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
