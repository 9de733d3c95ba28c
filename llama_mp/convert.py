"""Checkpoint converter.

  python -m llama_mp.convert llama2c --input stories260K.bin --output_dir D [--model_parallel_size N]
  python -m llama_mp.convert gguf --input model.gguf --output_dir D [--model_parallel_size N]
  python -m llama_mp.convert hf --input_dir HF --output_dir D [--model_parallel_size N]
  python -m llama_mp.convert reshard --input_dir A --output_dir B --model_parallel_size M
  python -m llama_mp.convert merge_lora --input_dir ADAPTER_CKPT_OR_RUN --output_dir D [--model_parallel_size N]
  python -m llama_mp.convert to_hf --input_dir D --output_dir HF

All but to_hf write the Meta layout (params.json + consolidated.NN.pth), with the tokenizer files (tokenizer.json,
tokenizer_config.json, ...) and generation_config.json beside the shards when the source has them; to_hf writes a
directory that transformers loads as LlamaForCausalLM. Round trips are exact: tensors are only renamed, permuted,
concatenated and split (a GGUF's quantized tensors are dequantized to float32 once). The output is written into a
temporary directory beside it and renamed into place when complete; an existing output directory is refused unless
--overwrite is given.
"""

import argparse
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from llama_mp import cli
from llama_mp.config import PositiveInt, add_config_flags, load_config, require
from llama_mp.distributed import global_rank
from llama_mp.checkpoint import (TOKENIZER_FILES, CheckpointError, copy_tokenizer_files, load_state, resolve_checkpoint,
                                 save_checkpoint, split_state)
from llama_mp.gguf_import import open_gguf, read_gguf
from llama_mp.hf_format import generation_config_of, read_hf, write_hf
from llama_mp.lora import merge_lora
from llama_mp.jsonl import read_json, write_json_atomic, write_text_atomic
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


# What a converter writes: an existing directory holding only these may be replaced with --overwrite.
OUTPUT_FILE = re.compile(r"params\.json|consolidated\.\d+\.pth|config\.json|model(-\d+-of-\d+)?\.safetensors|"
                         r"model\.safetensors\.index\.json|" + "|".join(re.escape(n) for n in TOKENIZER_FILES))


def refuse_existing(out_dir: str, overwrite: bool) -> None:
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    others = sorted(n for n in os.listdir(out_dir) if not OUTPUT_FILE.fullmatch(n))
    if others:
        raise FileExistsError(f"{out_dir}: exists and holds files a converter did not write (e.g. {others[0]}); "
                              f"choose a new or empty output directory")
    if not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a checkpoint (pass --overwrite to replace it)")


@contextmanager
def staged_output(out_dir: str, overwrite: bool):
    """Yield a temporary directory beside out_dir and rename it to out_dir when the body finishes: a failed or killed
    conversion never leaves a half-written checkpoint under the output name."""
    refuse_existing(out_dir, overwrite)
    out = os.path.abspath(out_dir)
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):  # --overwrite: the old directory goes only once the new one is complete
        old = f"{out}.old.{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def split_or_refuse(state: dict, args: ModelArgs, model_parallel_size: int, source: str) -> list[dict]:
    try:
        return split_state(state, args, model_parallel_size)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def convert_gguf(path: str, out_dir: str, model_parallel_size: int) -> ModelArgs:
    """GGUF -> Meta layout, with the GGUF's tokenizer as tokenizer.json + tokenizer_config.json beside it."""
    from llama_mp.tokenizer import tokenizer_files_from_gguf

    reader = open_gguf(path)  # opened once for the weights and the tokenizer
    args, state, generation = read_gguf(path, reader)
    shards = split_or_refuse(state, args, model_parallel_size, path)
    tokenizer_files = tokenizer_files_from_gguf(path, reader)  # before writing: an unsupported tokenizer fails early
    save_checkpoint(out_dir, args, shards)
    for name, text in tokenizer_files.items():
        write_text_atomic(os.path.join(out_dir, name), text)
    if generation and "generation_config.json" not in tokenizer_files:
        write_json_atomic(os.path.join(out_dir, "generation_config.json"), generation, indent=2)
    return args


def convert_hf(input_dir: str, out_dir: str, model_parallel_size: int) -> ModelArgs:
    """Hugging Face Llama -> Meta layout, tokenizer files copied, bos/eos ids kept in generation_config.json."""
    args, state = read_hf(input_dir)
    save_checkpoint(out_dir, args, split_or_refuse(state, args, model_parallel_size, input_dir))
    copied = copy_tokenizer_files(input_dir, out_dir)
    if "generation_config.json" not in copied:
        generation = generation_config_of(read_json(os.path.join(input_dir, "config.json")))
        if generation:
            write_json_atomic(os.path.join(out_dir, "generation_config.json"), generation, indent=2)
    return args


def reshard(input_dir: str, output_dir: str, model_parallel_size: int) -> ModelArgs:
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise CheckpointError(f"{output_dir}: output must differ from the input")
    # Each new shard is what a rank of the new size would load: the same slicing as loading at another size.
    new_shards = [load_state(input_dir, model_parallel_size, rank)[1] for rank in range(model_parallel_size)]
    args = load_state(input_dir, model_parallel_size, 0)[0]
    save_checkpoint(output_dir, args, new_shards)
    copy_tokenizer_files(input_dir, output_dir)
    return args


@dataclass
class Source:
    input: Optional[str] = field(default=None, metadata={"help": "the file to convert"})
    output_dir: Optional[str] = None
    model_parallel_size: PositiveInt = 1


@dataclass
class SourceDir:
    input_dir: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint directory, or a training output dir (its `latest` checkpoint)"})
    output_dir: Optional[str] = None
    model_parallel_size: PositiveInt = 1


@dataclass
class Reshard(SourceDir):
    model_parallel_size: Optional[PositiveInt] = field(default=None, metadata={"help": "the new shard count"})


@dataclass
class MergeLora(SourceDir):
    base_dir: Optional[str] = field(default=None, metadata={"help": "default: the base adapter_config.json names"})


@dataclass
class ToHf:
    input_dir: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint (any shard count; a reward model's backbone), or a training output dir (its latest)"})
    output_dir: Optional[str] = None
    tokenizer_dir: Optional[str] = field(default=None, metadata={
        "help": "take tokenizer files from here (e.g. the base checkpoint of a trained policy)"})


COMMANDS = {  # name: (options, help)
    "llama2c": (Source, "llama2.c version-0 .bin -> Meta layout"),
    "gguf": (Source, "llama.cpp GGUF (any dequantizable type) -> Meta layout"),
    "hf": (SourceDir, "Hugging Face Llama (safetensors + config.json) -> Meta layout"),
    "reshard": (Reshard, "N shards -> M shards"),
    "merge_lora": (MergeLora, "LoRA adapter checkpoint + its base -> Meta layout, adapters merged"),
    "to_hf": (ToHf, "Meta layout -> Hugging Face Llama (a directory transformers loads)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_mp.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML of the options below (every key is also a flag)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
        add_config_flags(p, options)
    flags = parser.parse_args()
    a = load_config(COMMANDS[flags.command][0], flags, flags.config)
    require(a, "input" if flags.command in ("llama2c", "gguf") else "input_dir", "output_dir",
            *(["model_parallel_size"] if flags.command == "reshard" else []))
    if global_rank() != 0:  # launched under torchrun/srun: one process converts, the others have nothing to do
        return
    source = getattr(a, "input", None) or a.input_dir
    if os.path.abspath(source) == os.path.abspath(a.output_dir):
        raise CheckpointError(f"{a.output_dir}: output must differ from the input")
    with staged_output(a.output_dir, flags.overwrite) as tmp:
        if flags.command == "llama2c":
            args, state = read_llama2c(a.input)
            save_checkpoint(tmp, args, split_or_refuse(state, args, a.model_parallel_size, a.input))
        elif flags.command == "gguf":
            args = convert_gguf(a.input, tmp, a.model_parallel_size)
        elif flags.command == "hf":
            args = convert_hf(a.input_dir, tmp, a.model_parallel_size)
        elif flags.command == "merge_lora":
            args = merge_lora(resolve_checkpoint(a.input_dir), tmp, a.model_parallel_size, a.base_dir)
        elif flags.command == "reshard":
            args = reshard(a.input_dir, tmp, a.model_parallel_size)
        else:
            args = write_hf(a.input_dir, tmp, a.tokenizer_dir)
    shards = "model.safetensors" if flags.command == "to_hf" else f"{a.model_parallel_size} shard(s)"
    print(f"wrote {a.output_dir}: {shards}, dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}")


if __name__ == "__main__":
    cli.run(main)
