"""GGUF (llama.cpp) -> this project's ModelArgs and a full state dict in Meta key names.

Every tensor is dequantized to float32 with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants
and whatever else the installed gguf package implements). llama.cpp's converter already stores q/k in Meta's
interleaved RoPE layout, so no permutation is applied. A Llama 3.1-style `rope_freqs.weight` (one divisor per inverse
frequency) becomes params.json's `rope_freq_divisors`.
"""

import os
import re

import numpy as np
import torch

from llama_mp.checkpoint import CheckpointError, check_full_state
from llama_mp.model import ModelArgs

ARCHITECTURES = ("llama",)  # GGUF architectures whose tensors are exactly Meta's LLaMA
BLOCK_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def open_gguf(path: str):
    """A gguf.GGUFReader over `path`; a missing, truncated or corrupt file is a one-line CheckpointError."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as err:
        message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        unknown_type = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", message)
        if unknown_type:  # a tensor type id this gguf package does not know
            raise CheckpointError(f"{path}: unknown GGUF tensor type id {unknown_type.group(1)} "
                                  f"(not a ggml type the installed gguf package knows)") from None
        if "cannot reshape" in message:  # the reader found fewer bytes than a tensor's shape needs
            raise CheckpointError(f"{path}: truncated GGUF file (a tensor's data runs past its end: {message})") \
                from None
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({message})") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
    for tensor in reader.tensors:  # the reader memory-maps lazily: a cut file shows as a short last tensor
        if tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(f"{path}: truncated GGUF file ({tensor.name} has {tensor.data.nbytes} of its "
                                  f"{tensor.n_bytes} bytes)")
    return reader


def field(reader, path: str, key: str, default=None, required: bool = True):
    """One metadata value (GGUF scalars and strings as Python values)."""
    if key not in reader.fields:
        if required and default is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key}")
        return default
    return reader.fields[key].contents()


def as_float32_decimal(value: float) -> float:
    """GGUF stores norm_eps / rope_theta as float32: take the shortest decimal that is that float32 (1e-5, not
    9.999999747378752e-06), which is what the writer of the file meant."""
    return float(str(np.float32(value)))


def dequantized(tensor, path: str) -> torch.Tensor:
    """The tensor as float32, [out_features, in_features] for matrices (ggml's ne order reversed)."""
    from gguf import quants

    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be "
                              f"dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, "
                              f"IQ types)") from None
    if not values.flags.writeable:  # F32 comes back as a read-only view of the memory-mapped file
        values = values.copy()
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def meta_name(name: str, arch: str, path: str) -> str:
    """GGUF tensor name -> Meta key name ('rope_freqs' for Llama 3.1's frequency divisors)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name == "rope_freqs.weight":
        return "rope_freqs"
    block = BLOCK_RE.match(name)
    if block and block.group(2) in BLOCK_NAMES:
        return f"layers.{int(block.group(1))}.{BLOCK_NAMES[block.group(2)]}.weight"
    raise CheckpointError(f"{path}: unexpected tensor {name} for a {arch} model")


def read_gguf(path: str, reader=None) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    """A llama-architecture GGUF file -> (args, full float32 state dict in Meta key names, generation config).

    The generation config is Hugging Face's generation_config.json content (the special token ids), which `to_hf`
    reads back for config.json. Metadata and names are checked before anything is dequantized. `reader`: the file's
    open gguf.GGUFReader, if the caller has one (opening parses every field: seconds for a large file)."""
    reader = reader or open_gguf(path)
    arch = field(reader, path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    scaling = field(reader, path, f"{arch}.rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported rope scaling {scaling!r} ({arch}.rope.scaling.type)")
    tensors = {meta_name(t.name, arch, path): t for t in reader.tensors}
    if "tok_embeddings.weight" not in tensors:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    dim, vocab = (int(n) for n in tensors["tok_embeddings.weight"].shape)  # ggml order: [dim, vocab]

    def meta(key, default=None):
        return field(reader, path, f"{arch}.{key}", default)

    n_heads = meta("attention.head_count")
    head_dim = meta("attention.key_length", dim // n_heads)
    rotary = meta("rope.dimension_count", head_dim)
    if rotary != head_dim or meta("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{path}: partial rotary or unequal key/value head sizes are not supported "
                              f"(rope.dimension_count {rotary}, head_dim {head_dim})")
    if meta("embedding_length") != dim:
        raise CheckpointError(f"{path}: token_embd.weight has width {dim} but {arch}.embedding_length is "
                              f"{meta('embedding_length')}")
    rope_freqs = tensors.pop("rope_freqs", None)
    divisors = None if rope_freqs is None else [float(d) for d in dequantized(rope_freqs, path)]
    params = dict(
        dim=dim, n_layers=meta("block_count"), n_heads=n_heads, n_kv_heads=meta("attention.head_count_kv", n_heads),
        vocab_size=vocab, hidden_dim=meta("feed_forward_length"),
        norm_eps=as_float32_decimal(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=as_float32_decimal(meta("rope.freq_base", 10000.0)), max_seq_len=meta("context_length"),
        tie_embeddings="output.weight" not in tensors, head_dim=head_dim, rope_freq_divisors=divisors)
    try:  # from_dict type-checks what the file said (a per-layer list where a number belongs, say)
        args = ModelArgs.from_dict(params)
        args.check()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    check_full_state({k: tuple(int(n) for n in reversed(t.shape)) for k, t in tensors.items()}, args, path)
    state = {key: dequantized(tensor, path) for key, tensor in tensors.items()}
    generation = {"bos_token_id": field(reader, path, "tokenizer.ggml.bos_token_id", required=False),
                  "eos_token_id": field(reader, path, "tokenizer.ggml.eos_token_id", required=False),
                  "pad_token_id": field(reader, path, "tokenizer.ggml.padding_token_id", required=False)}
    return args, state, {k: v for k, v in generation.items() if v is not None}
