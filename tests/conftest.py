"""Shared fixtures: the converted stories260K checkpoint, small random checkpoints, and multi-process runs."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_mp import distributed  # noqa: E402
from llama_mp.checkpoint import save_checkpoint, split_state  # noqa: E402
from llama_mp.convert import read_llama2c  # noqa: E402
from llama_mp.model import ModelArgs, Transformer  # noqa: E402
from llama_mp.tokenizer import Tokenizer  # noqa: E402

STORIES_BIN = os.path.join(ROOT, "data/llama2c/stories260K.bin")
TOK512 = os.path.join(ROOT, "data/llama2c/tok512.model")
# llama2.c's own C program gives this for BOS + "Once upon a time" and 60 greedy tokens (shared/reference).
STORIES_REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                     "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily")

GQA_ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
GQA4_ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stories260K"))
    args, state = read_llama2c(STORIES_BIN)
    save_checkpoint(out, args, split_state(state, args, 1))
    return out


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer(TOK512)


@pytest.fixture
def world1():
    """A plain single-process world (gloo, no port), torn down after the test."""
    info = distributed.init(1)
    yield info
    distributed.teardown()


def random_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict of random weights, norms included, for `args`."""
    started = not torch.distributed.is_initialized()
    if started:
        distributed.init(1)
    try:
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    finally:
        if started:
            distributed.teardown()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        noise = torch.randn(shape, generator=gen)
        state[key] = 1.0 + 0.1 * noise if key.endswith("norm.weight") else 0.3 * noise
    return state


def make_random_checkpoint(path: str, seed: int = 0, shards: int = 1, **overrides) -> ModelArgs:
    args = ModelArgs(**{**GQA_ARGS, **overrides})
    save_checkpoint(path, args, split_state(random_state(args, seed), args, shards))
    return args


@pytest.fixture
def gqa_dir(tmp_path):
    out = str(tmp_path / "gqa")
    make_random_checkpoint(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def run_distributed(fn, world: int, *args, tmp_dir: str):
    """Run fn(*args) in `world` fresh gloo processes (torchrun-style env); return each rank's return value."""
    mp.spawn(_spawned, args=(world, free_port(), fn, args, tmp_dir), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def run_clis(*argvs, timeout=120):
    """run_cli of each argument list, two at a time (each process has one thread, this machine two cores: start-up
    bound commands finish in about half the time); the results in the order given."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda argv: run_cli(*argv, timeout=timeout), argvs))


def run_cli(*argv, env=None, timeout=120):
    """Run `python -m ...` from the repository root; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("LLAMA_MP_DEBUG", None)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
