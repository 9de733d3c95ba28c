"""What every command-line entry point shares: one-line errors for bad input, rank-0 printing, model flags.

Imports nothing heavy at module level: the CPU-only commands (CSV conversion, aggregation, evaluation, ...) start
without loading torch; the model-loading helpers import it when called."""

import ctypes
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from llama_mp.config import PositiveInt, require


def _rank() -> int:
    """This process's rank in the process group, 0 when there is none (torch is never imported for the question)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def keep_freed_memory() -> None:
    """glibc's malloc: keep freed memory in the process instead of handing it back to the system and faulting fresh
    pages in at the next allocation of the same size (mallopt(3): M_MMAP_MAX 0 serves every block from the heap,
    M_TRIM_THRESHOLD -1 never trims; an explicit malloc_trim still does). An inference loop whose tensor shapes vary
    from call to call (a judge's prompts, a sampler's ragged batches) spent 10-15% of its time in page faults otherwise:
    SmolLM2's judge, one thread, 3.3-3.5 -> 2.85-2.9 s a pair. Blocks above 32 MB (the largest mmap threshold glibc
    takes) are served by the heap too: mapped afresh, SmolLM2's head-sized [49152, 576] tensors of a full fine-tuning
    step cost 100-170 ms each (that bf16 step at 8 x 512 on 2 threads: 299 tokens/s with glibc's defaults, 349 with
    this setting). The resident size no longer shrinks after a peak; the peak is unchanged. Without glibc nothing is
    done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)
    libc.mallopt(m_top_pad, 64 << 20)


def run(main: Callable[[], None]) -> None:
    """Run `main`; bad input (a ValueError/OSError raised with a message naming the file) exits 2 with one line.

    Set LLAMA_MP_DEBUG=1 to get the full traceback instead.
    """
    keep_freed_memory()
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


DTYPES = ("float32", "bfloat16", "float16")  # --dtype names, torch.<name>
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class Layout:
    """How a command's models are laid out: the tensor-parallel size and the compute dtype of its loaded models."""
    model_parallel_size: Optional[PositiveInt] = field(default=None, metadata={"help": "default: the world size"})
    dtype: Dtype = field(default="auto", metadata={"help": "auto: bfloat16 on CUDA, else float32"})


@dataclass
class ModelOptions(Layout):
    """The options every command that loads one language model shares (names as in Meta's llama examples): keys of
    the command's --config and flags, like its own options."""
    ckpt_dir: Optional[str] = field(default=None, metadata={
        "help": "Meta-layout checkpoint (params.json + consolidated.NN.pth), or a LoRA adapter checkpoint"})
    tokenizer_path: Optional[str] = field(default=None, metadata={
        "help": "a SentencePiece .model, a tokenizer.json, or a directory carrying one (default: ckpt_dir's own)"})
    max_seq_len: Optional[PositiveInt] = field(default=None, metadata={"help": "context length (default: params.json's)"})
    max_batch_size: PositiveInt = 32
    decode_weights: Literal["model", "q8_0"] = field(default="model", metadata={
        "help": "what a batch-1 decode step on a CPU reads: the weights, or q8_0 (int8 copies, 32 weights to a "
                "scale, inputs quantized alike: ~1.3-1.6x as fast, logits off by about twice bfloat16's error)"})


def resolve_dtype(name: str, device):
    """--dtype: auto is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name in DTYPES:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(opts: ModelOptions, seed: int):
    """Join the process group (torch seeded with `seed`) and load the model shard (a checkpoint or a LoRA adapter
    checkpoint, merged in memory) and the tokenizer for this rank: (DistInfo, Sampler). A reward model's checkpoint is
    refused."""
    from llama_mp import distributed
    from llama_mp.checkpoint import check_policy
    from llama_mp.lora import load_model
    from llama_mp.sampler import Sampler
    from llama_mp.tokenizer import load_tokenizer

    require(opts, "ckpt_dir")
    check_policy(opts.ckpt_dir)  # these commands sample from a language model, never from a reward model
    info = distributed.init(opts.model_parallel_size, seed=seed)
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    dtype = resolve_dtype(opts.dtype, info.device)
    model = load_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                       device=info.device, dtype=dtype)
    return info, Sampler(model, tokenizer, max_batch_size=opts.max_batch_size, decode_weights=opts.decode_weights)
