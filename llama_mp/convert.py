"""Checkpoint converter.

  python -m llama_mp.convert llama2c --input stories260K.bin --output_dir D [--model_parallel_size N]
  python -m llama_mp.convert reshard --input_dir A --output_dir B --model_parallel_size M

Both write the Meta layout (params.json + consolidated.NN.pth). Round trips are exact: resharding only concatenates
and splits tensors. An existing output directory is refused unless --overwrite is given.
"""

import argparse
import os
import struct

import numpy as np
import torch

from llama_mp import cli
from llama_mp.distributed import global_rank
from llama_mp.checkpoint import CheckpointError, load_state, save_checkpoint, split_state
from llama_mp.model import ModelArgs

LLAMA2C_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def multiple_of_for(dim: int, hidden_dim: int):
    """The largest power-of-two `multiple_of` for which Meta's SwiGLU rounding gives hidden_dim, or None."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ModelArgs(dim=dim, multiple_of=multiple_of).ffn_hidden_dim == hidden_dim:
            return multiple_of
    return None


def read_llama2c(path: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A llama2.c legacy (version 0) .bin -> (args, full state dict in Meta key names)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    raw = open(path, "rb").read()
    if len(raw) < LLAMA2C_HEADER.size:
        raise CheckpointError(f"{path}: truncated llama2.c file ({len(raw)} bytes, shorter than its header)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = LLAMA2C_HEADER.unpack_from(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0 or dim % n_heads:
        header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
        raise CheckpointError(f"{path}: not a llama2.c version-0 file (header {header})")
    tied, vocab = vocab > 0, abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    layout = [("tok_embeddings", (vocab, dim)), ("attention_norm", (n_layers, dim)),
              ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)),
              ("wo", (n_layers, dim, dim)), ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
              ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("norm", (dim,)),
              ("freq_cis_real", (seq_len, head_dim // 2)), ("freq_cis_imag", (seq_len, head_dim // 2))]
    if not tied:
        layout.append(("output", (vocab, dim)))
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = LLAMA2C_HEADER.size + 4 * n_floats
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header implies"
        raise CheckpointError(f"{path}: {what} ({len(raw)} bytes, expected {expected} for this header)")
    floats = np.frombuffer(raw, dtype="<f4", offset=LLAMA2C_HEADER.size)
    blocks, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        blocks[name] = torch.from_numpy(floats[offset:offset + size].copy()).view(shape)
        offset += size

    state = {"tok_embeddings.weight": blocks["tok_embeddings"], "norm.weight": blocks["norm"]}
    if not tied:
        state["output.weight"] = blocks["output"]
    names = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
             "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
             "attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}
    for layer in range(n_layers):
        for src, dst in names.items():
            state[f"layers.{layer}.{dst}.weight"] = blocks[src][layer].clone()
    multiple_of = multiple_of_for(dim, hidden)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     multiple_of=multiple_of or 256, hidden_dim=None if multiple_of else hidden, norm_eps=1e-5,
                     rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=tied)
    return args, state


def refuse_existing(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(out_dir, "params.json")) and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a checkpoint (pass --overwrite to replace it)")


def reshard(input_dir: str, output_dir: str, model_parallel_size: int) -> ModelArgs:
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise CheckpointError(f"{output_dir}: output must differ from the input")
    # Each new shard is what a rank of the new size would load: the same slicing as loading at another size.
    new_shards = [load_state(input_dir, model_parallel_size, rank)[1] for rank in range(model_parallel_size)]
    args = load_state(input_dir, model_parallel_size, 0)[0]
    save_checkpoint(output_dir, args, new_shards)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_mp.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("llama2c", help="llama2.c version-0 .bin -> Meta layout")
    p.add_argument("--input", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_parallel_size", type=cli.positive_int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("reshard", help="N shards -> M shards")
    p.add_argument("--input_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_parallel_size", type=cli.positive_int, required=True)
    p.add_argument("--overwrite", action="store_true")
    a = parser.parse_args()
    if global_rank() != 0:  # launched under torchrun/srun: one process converts, the others have nothing to do
        return
    refuse_existing(a.output_dir, a.overwrite)
    if a.command == "llama2c":
        args, state = read_llama2c(a.input)
        try:
            shards = split_state(state, args, a.model_parallel_size)
        except ValueError as err:
            raise CheckpointError(f"{a.input}: {err}") from None
        save_checkpoint(a.output_dir, args, shards)
    else:
        args = reshard(a.input_dir, a.output_dir, a.model_parallel_size)
    print(f"wrote {a.output_dir}: {a.model_parallel_size} shard(s), dim {args.dim}, {args.n_layers} layers, "
          f"vocab {args.vocab_size}")


if __name__ == "__main__":
    cli.run(main)
