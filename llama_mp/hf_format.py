"""Hugging Face Llama (safetensors + config.json) <-> this project's Meta layout.

The only non-trivial step is RoPE's pairing: Meta rotates interleaved pairs (x[2i], x[2i+1]) of each head, Hugging Face
rotates halves (x[i], x[i + head_dim/2]) ("rotate_half"), so q and k rows are permuted per head: Meta row
h*hd + 2i + p is HF row h*hd + p*hd/2 + i (k with the kv head count). Everything else is renaming, so both
directions are exact.
"""

import dataclasses
import os
import re
from typing import Optional

import torch

from llama_mp.checkpoint import (CheckpointError, check_full_state, copy_tokenizer_files, load_state,
                                 resolve_checkpoint)
from llama_mp.jsonl import read_json, write_json_atomic
from llama_mp.model import LLAMA3_SCALING_KEYS, ModelArgs, llama3_scaled, rope_frequencies

LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {hf: meta for meta, hf in LAYER_NAMES.items()}
HF_TOP_NAMES = {hf: meta for meta, hf in TOP_NAMES.items()}
META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_name(key: str) -> str:
    """Meta key -> Hugging Face key."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    layer, name = META_LAYER_KEY.fullmatch(key).groups()
    return f"model.layers.{layer}.{LAYER_NAMES[name]}.weight"


def meta_name(key: str, where: str) -> Optional[str]:
    """Hugging Face key -> Meta key (None for the RoPE buffers that older checkpoints saved)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key in HF_TOP_NAMES:
        return HF_TOP_NAMES[key]
    match = HF_LAYER_KEY.fullmatch(key)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.weight"
    raise CheckpointError(f"{where}: unexpected tensor {key} for a Llama model")


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved RoPE pairs -> rotate_half halves, per head: [n_heads * hd, in]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """rotate_half halves -> interleaved RoPE pairs, per head (the inverse of meta_to_hf_rows)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permuted_heads(key: str, args: ModelArgs) -> Optional[int]:
    """The head count to permute a q/k weight with (None for every other weight)."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.kv_heads  # k has the kv heads' rows: permuting with n_heads is the classic GQA bug
    return None


# ---- Hugging Face -> Meta --------------------------------------------------------------------------------------------
def rope_settings(config: dict, path: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 rope_scaling or None) from either transformers 4's `rope_theta` + `rope_scaling` or
    transformers 5's `rope_parameters`."""
    nested = config.get("rope_parameters") or {}
    scaling = {**(config.get("rope_scaling") or {}), **nested}
    theta = nested.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{path}: unsupported rope scaling type {kind!r} (supported: default, llama3)")
    for key in LLAMA3_SCALING_KEYS:
        if key not in scaling:
            raise CheckpointError(f"{path}: rope scaling of type llama3 lacks {key!r}")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS}}


def hf_args(config: dict, path: str) -> ModelArgs:
    """ModelArgs from a Llama config.json; a missing key or an unsupported feature is a one-line error."""
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {config['model_type']!r} is not supported (only llama)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key {key!r}")
    for key, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, plain) != plain:
            raise CheckpointError(f"{path}: {key} {config[key]!r} is not supported (only {plain!r})")
    theta, scaling = rope_settings(config, path)
    heads = config["num_attention_heads"]
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "n_heads": heads,
              "n_kv_heads": config.get("num_key_value_heads") or heads, "vocab_size": config["vocab_size"],
              "hidden_dim": config["intermediate_size"], "norm_eps": config["rms_norm_eps"], "rope_theta": theta,
              "max_seq_len": config.get("max_position_embeddings", 2048),
              "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
              "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "rope_scaling": scaling}
    try:
        args = ModelArgs.from_dict(params)
        args.check()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return args


def safetensors_files(input_dir: str) -> list[str]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = os.path.join(input_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = [os.path.join(input_dir, name) for name in sorted(set(weight_map.values()))]
    else:
        files = [os.path.join(input_dir, "model.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (a Hugging Face checkpoint needs model.safetensors or an index)")
    return files


def read_hf(input_dir: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A Hugging Face Llama directory -> (args, full state dict in Meta names and layout, dtypes kept)."""
    from safetensors import SafetensorError, safe_open

    config_path = os.path.join(input_dir, "config.json")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    args = hf_args(config, config_path)
    state = {}
    for file in safetensors_files(input_dir):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = meta_name(key, file)
                    if name is not None:
                        state[name] = f.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    if args.tie_embeddings:
        state.pop("output.weight", None)  # some tied checkpoints store lm_head anyway, as a copy of the embedding
    check_full_state({k: v.shape for k, v in state.items()}, args, input_dir)
    for key, tensor in state.items():
        heads = permuted_heads(key, args)
        if heads is not None:
            state[key] = hf_to_meta_rows(tensor, heads)
    return args, state


def generation_config_of(config: dict) -> dict:
    """generation_config.json content from config.json's special token ids (kept when the HF dir has none)."""
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}


# ---- Meta -> Hugging Face --------------------------------------------------------------------------------------------
def special_token_ids(ckpt_dir: str) -> dict:
    """bos/eos/pad ids: from generation_config.json beside the weights, else from a SentencePiece tokenizer.model."""
    path = os.path.join(ckpt_dir, "generation_config.json")
    if os.path.isfile(path):
        return generation_config_of(read_json(path))
    model = os.path.join(ckpt_dir, "tokenizer.model")
    if os.path.isfile(model):
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor(model_file=model)
        return {k: v for k, v in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()),
                                  ("pad_token_id", sp.pad_id())) if v >= 0}
    return {}


def scaling_from_divisors(args: ModelArgs, where: str) -> dict:
    """A GGUF's rope_freqs divisors as the llama3 rope_scaling llama.cpp made them from (Llama 3.1 and 3.2: low 1,
    high 4, original context 8192, factor = the largest divisor); other divisors have no config.json spelling."""
    divisors = torch.tensor(args.rope_freq_divisors, dtype=torch.float32)
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    plain = rope_frequencies(dataclasses.replace(args, rope_freq_divisors=None))
    if torch.allclose(plain / divisors, llama3_scaled(plain, **{k: scaling[k] for k in LLAMA3_SCALING_KEYS}),
                      rtol=1e-5, atol=0):
        return scaling
    raise CheckpointError(f"{where}: rope_freq_divisors are not Llama 3's rope scaling, and config.json has no way "
                          f"to state other divisors")


def hf_config(args: ModelArgs, dtype: torch.dtype, token_ids: dict) -> dict:
    """config.json for LlamaForCausalLM (rope settings in transformers 4's spelling, which transformers 5 reads too)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
            "hidden_act": "silu", "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling, "vocab_size": args.vocab_size,
            "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, **token_ids}


def write_hf(ckpt_dir: str, out_dir: str, tokenizer_dir: Optional[str] = None) -> ModelArgs:
    """A Meta-layout checkpoint of any shard count (a policy, or a reward model's backbone: head.pth and trainer
    state are not part of it) -> model.safetensors + config.json + generation_config.json + tokenizer files (those
    beside the checkpoint, or in tokenizer_dir)."""
    from safetensors.torch import save_file

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, "adapter_config.json")):
        raise CheckpointError(f"{ckpt_dir}: a LoRA adapter checkpoint; merge it into its base first "
                              f"(llama_mp.lora.merge_lora) and export the merged checkpoint")
    tokenizer_dir = tokenizer_dir or ckpt_dir
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: tokenizer directory not found")
    args, state = load_state(ckpt_dir, 1, 0)
    if args.rope_freq_divisors is not None:
        scaling = scaling_from_divisors(args, os.path.join(ckpt_dir, "params.json"))
        args = dataclasses.replace(args, rope_freq_divisors=None, rope_scaling=scaling)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    hf_state = {}
    for key, tensor in state.items():
        heads = permuted_heads(key, args)
        hf_state[hf_name(key)] = meta_to_hf_rows(tensor, heads) if heads is not None else tensor.contiguous()
    save_file(hf_state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    token_ids = special_token_ids(tokenizer_dir)
    copied = copy_tokenizer_files(tokenizer_dir, out_dir)
    write_json_atomic(os.path.join(out_dir, "config.json"),
                      hf_config(args, state["tok_embeddings.weight"].dtype, token_ids), indent=2)
    if "generation_config.json" not in copied:
        write_json_atomic(os.path.join(out_dir, "generation_config.json"), token_ids, indent=2)
    return args

