"""Meta-layout checkpoints: `params.json` + `consolidated.NN.pth`, one shard per model-parallel rank.

Loading at a model-parallel size other than the shard count reshards in memory: each weight's slice for this rank is
cut from the (memory-mapped) shards that overlap it, along the dimension its layer splits. Every load uses `weights_only=True`.
Errors are `CheckpointError` with one sentence naming the file and the problem.
"""

import glob
import json
import os
import re
import shutil
from typing import Optional

import torch

from llama_mp.jsonl import atomic_write, write_json_atomic
from llama_mp.model import ModelArgs, Transformer
# a trainer's output directory (checkpoint-N/ and the `latest` pointer) is in output_dir.py, which needs no torch
from llama_mp.output_dir import (CHECKPOINT_FILES, LATEST, CheckpointError, is_checkpoint,  # noqa: F401
                                 latest_checkpoint, resolve_checkpoint, resume_args, write_latest)

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
IGNORED_KEYS = {"rope.freqs"}  # Meta's checkpoints carry the RoPE table; it is recomputed here


def split_dim(key: str, args: ModelArgs) -> Optional[int]:
    """The dimension along which a weight is sharded across model-parallel ranks (None: replicated)."""
    if key == "tok_embeddings.weight":
        return 0 if args.tie_embeddings else 1  # VocabParallelEmbedding vs ParallelEmbedding
    if key == "output.weight" or key.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                                                "feed_forward.w1.weight", "feed_forward.w3.weight")):
        return 0  # column parallel: output features
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # row parallel: input features
    if key == "norm.weight" or key.endswith(("attention_norm.weight", "ffn_norm.weight")):
        return None
    raise CheckpointError(f"unknown key {key!r}")


def read_params(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (a Meta-layout checkpoint needs params.json)")
    try:
        with open(path) as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return params


def shard_paths(ckpt_dir: str) -> list[str]:
    """consolidated.00.pth .. consolidated.{N-1}.pth, checked to be complete."""
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth shards")
    numbers = sorted(int(SHARD_RE.search(p).group(1)) for p in paths if SHARD_RE.search(p))
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: shard consolidated.{missing[0]:02d}.pth is missing "
                              f"(found {len(numbers)} of {max(numbers) + 1})")
    return [os.path.join(ckpt_dir, f"consolidated.{n:02d}.pth") for n in numbers]


def load_shard(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file "
                              f"({str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return {k: v for k, v in state.items() if k not in IGNORED_KEYS}


HEAD_FILE = "head.pth"  # a training run's heads; a reward model's holds its scalar head (head.weight, head.bias)


def has_reward_head(ckpt_dir: str) -> bool:
    """Whether ckpt_dir is a reward model: its head.pth holds a reward head. (Every trainer writes head.pth; a
    policy's, from SFT, DPO or PPO, is empty.)"""
    path = os.path.join(ckpt_dir, HEAD_FILE)
    if not os.path.isfile(path):
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file "
                              f"({str(err).splitlines()[0][:200]})") from None
    return isinstance(state, dict) and "head.weight" in state


def check_policy(ckpt_dir: str) -> None:
    """A command that samples from or trains a language model refuses a reward model's checkpoint (its backbone was
    trained to score through the head, not to predict text)."""
    try:
        reward_model = bool(ckpt_dir) and has_reward_head(ckpt_dir)
    except CheckpointError:  # an unreadable head.pth: no concern of a command that loads only the shards
        return
    if reward_model:
        raise CheckpointError(f"{ckpt_dir}: a reward model (its {HEAD_FILE} holds a reward head), not a policy; "
                              f"give a language-model checkpoint")


def check_reward_model(ckpt_dir: str) -> None:
    """A command that reads rewards refuses a checkpoint without a trained reward head (it would score with a random
    one)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not is_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no checkpoint here (no {' or '.join(CHECKPOINT_FILES)}, no {LATEST} "
                              f"pointer to one); train a reward model first (scripts/train_reward_model.sh)")
    if not has_reward_head(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: not a reward model (no reward head in {HEAD_FILE}); give a "
                              f"step2_reward_model.train_reward_model checkpoint")


def model_args(params: dict, first_shard: dict, n_shards: int, ckpt_dir: str,
               max_seq_len: Optional[int] = None) -> ModelArgs:
    """ModelArgs from params.json, with vocab_size -1 resolved from the embedding and max_seq_len overridden."""
    params = dict(params)
    if max_seq_len is not None:
        params["max_seq_len"] = max_seq_len
    try:
        args = ModelArgs.from_dict(params)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'params.json')}: {err}") from None
    if args.vocab_size <= 0:
        emb = first_shard.get("tok_embeddings.weight")
        if emb is None:
            raise CheckpointError(f"{ckpt_dir}: vocab_size is {args.vocab_size} and there is no tok_embeddings.weight")
        args.vocab_size = emb.shape[0] * (n_shards if args.tie_embeddings else 1)
    return args


def check_same_keys(shards: list[dict], where: str) -> None:
    keys = set(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:3]
            raise CheckpointError(f"{where}: shard {i:02d} has different keys from shard 00 (e.g. {diff})")


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every stored weight of the unsharded model and its shape, in Meta key names (a tied output is not stored)."""
    dim, q, kv, hidden = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim), "norm.weight": (dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, dim)
    layer = {"attention.wq": (q, dim), "attention.wk": (kv, dim), "attention.wv": (kv, dim), "attention.wo": (dim, q),
             "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim),
             "attention_norm": (dim,), "ffn_norm": (dim,)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    return shapes


def check_full_state(shapes: dict[str, tuple], args: ModelArgs, where: str) -> None:
    """A converter's whole state (key -> shape) must be exactly what `args` implies: nothing missing, extra or
    mis-shaped (checked before anything is written)."""
    expected = full_shapes(args)
    missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unknown:
        raise CheckpointError(f"{where}: unexpected weights {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(shapes[key])} but the config implies {shape}")


def split_state(state: dict[str, torch.Tensor], args: ModelArgs, n: int) -> list[dict[str, torch.Tensor]]:
    args.check(n)
    out = [{} for _ in range(n)]
    for key, tensor in state.items():
        dim = split_dim(key, args)
        pieces = [tensor] * n if dim is None else torch.chunk(tensor, n, dim=dim)
        for shard, piece in zip(out, pieces):
            shard[key] = piece  # a view: save_shard gives each saved tensor its own storage
    return out


def load_state(ckpt_dir: str, model_parallel_size: int, model_parallel_rank: int,
               max_seq_len: Optional[int] = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, this rank's weights) from a checkpoint with any number of shards.

    With another shard count, each weight's slice for this rank is cut from the shards that overlap it; the shards
    are memory-mapped, so a rank reads only the parts it keeps."""
    params = read_params(ckpt_dir)
    paths = shard_paths(ckpt_dir)
    if len(paths) == model_parallel_size:
        shard = load_shard(paths[model_parallel_rank])
        return model_args(params, shard, len(paths), ckpt_dir, max_seq_len), shard
    shards = [load_shard(p) for p in paths]
    args = model_args(params, shards[0], len(paths), ckpt_dir, max_seq_len)
    try:
        args.check(model_parallel_size)
    except ValueError as err:
        raise CheckpointError(f"{ckpt_dir}: cannot reshard {len(paths)} shards to {model_parallel_size}: {err}") from None
    check_same_keys(shards, ckpt_dir)
    state = {}
    for key in shards[0]:
        dim = split_dim(key, args)
        if dim is None:
            state[key] = shards[0][key].clone()
            continue
        sizes = [s[key].shape[dim] for s in shards]
        per_rank = sum(sizes) // model_parallel_size
        lo, hi = model_parallel_rank * per_rank, (model_parallel_rank + 1) * per_rank
        pieces, offset = [], 0
        for shard, size in zip(shards, sizes):
            start, stop = max(lo, offset), min(hi, offset + size)
            if start < stop:
                pieces.append(shard[key].narrow(dim, start - offset, stop - start))
            offset += size
        state[key] = torch.cat(pieces, dim=dim)
    return args, state


def load_into(model: Transformer, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`, refusing unknown, missing or mis-shaped weights (no silent strict=False)."""
    expected = {k: v for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("output.weight", None)
        state = {k: v for k, v in state.items() if k != "output.weight"}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if missing:
        raise CheckpointError(f"{where}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)} but params.json and the "
                                  f"model-parallel size imply {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def load_weights(model: Transformer, ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0) -> None:
    """Fill an existing model (e.g. when resuming) from a checkpoint of any shard count."""
    _, state = load_state(ckpt_dir, model_parallel_size, model_parallel_rank)
    load_into(model, state, ckpt_dir)


def load_model(ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0,
               max_seq_len: Optional[int] = None, device="cpu", dtype=torch.float32) -> Transformer:
    """Build the Transformer for this rank and fill it from a Meta-layout checkpoint of any shard count."""
    args, state = load_state(ckpt_dir, model_parallel_size, model_parallel_rank, max_seq_len)
    default_dtype = torch.get_default_dtype()
    try:  # built directly in the target dtype and device: no float32 copy of a bf16 model on the way
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Transformer(args)
    except ValueError as err:
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'params.json')}: {err}") from None
    finally:
        torch.set_default_dtype(default_dtype)
    load_into(model, state, ckpt_dir)
    return model


def model_params(args: ModelArgs) -> dict:
    """params.json content for `args`: Meta's keys, plus this project's (hidden_dim, tie_embeddings, head_dim,
    rope_scaling, rope_freq_divisors) only when they matter."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len}
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.hidden_dim is not None:
        params["hidden_dim"] = args.hidden_dim
    if args.tie_embeddings:
        params["tie_embeddings"] = True
    if args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    if args.rope_scaling is not None:
        params["rope_scaling"] = dict(args.rope_scaling)
    if args.rope_freq_divisors is not None:
        params["rope_freq_divisors"] = [float(d) for d in args.rope_freq_divisors]
    return params


def save_params(out_dir: str, args: ModelArgs) -> None:
    write_json_atomic(os.path.join(out_dir, "params.json"), model_params(args), indent=2)


def save_shard(out_dir: str, model_parallel_rank: int, state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Write one rank's shard atomically (tied checkpoints store the shared matrix once, as tok_embeddings)."""
    state = {k: _own_storage(v.detach().to("cpu")) for k, v in state.items()
             if not (args.tie_embeddings and k == "output.weight")}
    atomic_write(os.path.join(out_dir, f"consolidated.{model_parallel_rank:02d}.pth"), lambda tmp: torch.save(state, tmp))


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage: copy views (e.g. fused projections) to tensors of their own."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def save_checkpoint(out_dir: str, args: ModelArgs, shards: list[dict[str, torch.Tensor]]) -> None:
    """Write a whole checkpoint from one process (the converters); trainers call save_shard per rank instead."""
    for stale in glob.glob(os.path.join(out_dir, "consolidated.*.pth")):
        os.remove(stale)  # a smaller shard count must not leave old shards behind
    for rank, shard in enumerate(shards):
        save_shard(out_dir, rank, shard, args)
    save_params(out_dir, args)


# ---- files beside the weights --------------------------------------------------------------------------------------
# The tokenizer and chat template travel with the weights (conversions, trained checkpoints, exports), so that a
# checkpoint directory is all a command needs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy those of TOKENIZER_FILES that src_dir has; returns their names."""
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return copied


def tokenizer_home(tokenizer) -> Optional[str]:
    """The directory a tokenizer was loaded from when it is a checkpoint's own (tokenizer.json / tokenizer.model by
    those names), else None: a stand-alone file such as data/llama2c/tok512.model is not copied anywhere."""
    path = getattr(tokenizer, "path", "") or ""
    return os.path.dirname(path) if os.path.basename(path) in ("tokenizer.json", "tokenizer.model") else None
