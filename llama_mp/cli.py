"""What every command-line entry point shares: one-line errors for bad input, rank-0 printing, model flags.

Imports nothing heavy at module level: the CPU-only commands (CSV conversion, aggregation, evaluation, ...) start
without loading torch; the model-loading helpers import it when called."""

import argparse
import os
import sys
from typing import Callable


def _rank() -> int:
    """This process's rank in the process group, 0 when there is none (torch is never imported for the question)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def run(main: Callable[[], None]) -> None:
    """Run `main`; bad input (a ValueError/OSError raised with a message naming the file) exits 2 with one line.

    Set LLAMA_MP_DEBUG=1 to get the full traceback instead.
    """
    try:
        main()
    except (ValueError, OSError, KeyError) as err:
        if os.environ.get("LLAMA_MP_DEBUG"):
            raise
        rank = _rank()
        print(f"error: {err}" if rank == 0 else f"error (rank {rank}): {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if "llama_mp.distributed" in sys.modules:  # a process group was (maybe) started: end it cleanly
            sys.modules["llama_mp.distributed"].teardown()


def log(*args, **kwargs) -> None:
    """print on global rank 0 only, flushed (so that srun/torchrun logs interleave sensibly)."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


DTYPES = ("float32", "bfloat16", "float16")  # --dtype names, torch.<name>


def add_model_args(parser: argparse.ArgumentParser, required: bool = True, seed: bool = True) -> None:
    """The flags every model-loading command shares (names as in Meta's llama examples). seed=False: the command's
    config has the seed (and its --seed flag); the command sets opts.seed from it before build()."""
    parser.add_argument("--ckpt_dir", required=required,
                        help="Meta-layout checkpoint (params.json + consolidated.NN.pth), or a LoRA adapter checkpoint")
    parser.add_argument("--tokenizer_path", default=None,
                        help="a SentencePiece .model (e.g. data/llama2c/tok512.model), a tokenizer.json, or a directory "
                             "carrying one (default: --ckpt_dir, when it carries tokenizer.json or tokenizer.model)")
    parser.add_argument("--max_seq_len", type=positive_int, default=None, help="context length (default: params.json's)")
    parser.add_argument("--max_batch_size", type=positive_int, default=32)
    parser.add_argument("--model_parallel_size", type=positive_int, default=None, help="default: the world size")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    if seed:
        parser.add_argument("--seed", type=int, default=1)


def resolve_dtype(name: str, device):
    """--dtype: auto is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name in DTYPES:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(opts: argparse.Namespace):
    """Join the process group and load the model shard (a checkpoint or a LoRA adapter checkpoint, merged in memory)
    and the tokenizer for this rank: (DistInfo, Sampler). A reward model's checkpoint is refused."""
    from llama_mp import distributed
    from llama_mp.checkpoint import check_policy
    from llama_mp.lora import load_model
    from llama_mp.sampler import Sampler
    from llama_mp.tokenizer import load_tokenizer

    check_policy(opts.ckpt_dir)  # these commands sample from a language model, never from a reward model
    info = distributed.init(opts.model_parallel_size, seed=opts.seed)
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    dtype = resolve_dtype(opts.dtype, info.device)
    model = load_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                       device=info.device, dtype=dtype)
    return info, Sampler(model, tokenizer, max_batch_size=opts.max_batch_size)
