"""LoRA on the tensor-parallel layers: y = W x + (alpha / r) B A dropout(x), with W frozen and A, B trained.

Each adapter is split like the layer it adapts, so that every rank computes exactly its part of the unsplit adapter:
  - column-parallel W [out / mp, in] (wq wk wv w1 w3): A [r, in] replicated, B [out / mp, r] split along the output
    like W. A x is the same on every rank; its gradient is summed over the group (copy_to_model_parallel_region);
  - row-parallel W [out, in / mp] (wo w2): A [r, in / mp] split along the input like W, B [out, r] replicated.
    A x is summed over the ranks' input slices (reduce_from_model_parallel_region), then B applies on every rank.
A starts Kaiming-uniform (PEFT's U(-1/sqrt(in), 1/sqrt(in))), drawn for the whole unsplit matrix from a generator seeded
by the seed and the layer's name and then cut to this rank's part, and B starts at 0: a fresh adapter leaves the model
unchanged and starts from the same point at any model-parallel size. Dropout masks are drawn over the whole input width
from torch's generator (the same on every rank of a group) and cut the same way, so TP = N computes what TP = 1 does.

An adapter is attached to its layer as `layer.lora` with a forward hook that adds its output: the base keeps its
Meta-layout keys (`layers.0.attention.wq.weight`), the adapters add `layers.0.attention.wq.lora.A` / `.lora.B`. At
sampling, where the model runs wq|wk|wv and w1|w3 as one matmul each (Transformer.fuse_projections), those layers'
adapters join the fused matmul instead (StackedAdapters, set on the block's attention and feed-forward).

The adapter checkpoint (what a LoRA run's checkpoint-N/ holds instead of consolidated.NN.pth):
  adapter_config.json   {"base": the base checkpoint directory, "base_params": its params, "rank", "alpha",
                         "dropout", "targets"}
  adapter.NN.pth        model-parallel rank NN's adapter tensors (B of column layers and A of row layers split)
`merge_lora` folds the adapters into the base: W' = W + (alpha / r) B A, written as a Meta-layout checkpoint (with the
base's tokenizer files and the run's head.pth, so a merged reward model is a reward model); `load_model` does the same
in memory, so the trainers take an adapter checkpoint wherever they take a checkpoint.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama_mp import checkpoint
from llama_mp.checkpoint import CheckpointError, load_state, model_params, save_checkpoint, split_state
from llama_mp.jsonl import atomic_write, write_json_atomic

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # column-parallel layers: output features split
ROW = ("wo", "w2")  # row-parallel layers: input features split
CONFIG = "adapter_config.json"  # one of output_dir.CHECKPOINT_FILES: what marks a checkpoint directory
SHARD_RE = re.compile(r"adapter\.(\d+)\.pth$")


def _dropout(x: torch.Tensor, p: float, width: int, part: slice) -> torch.Tensor:
    """x * keep / (1 - p), the keep mask drawn over the whole (unsplit) input width and cut to this rank's part."""
    keep = torch.rand(*x.shape[:-1], width, device=x.device) >= p
    return x * (keep[..., part].to(x.dtype) / (1 - p))


def _adapter_input(adapter: "LoRA", x: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype (a bfloat16 base outside autocast: the adapter still computes in its own dtype), except
    under autocast without dropout: there the matmuls take the autocast dtype anyway, and a float32 copy of every
    adapted layer's input (cast straight back by autocast, both casts again in the backward) was ~5% of a LoRA step.
    (Dropout keeps the copy: its 1 / (1 - p) scaling in float32, as without autocast.)"""
    dropping = adapter.training and adapter.dropout > 0
    return x if torch.is_autocast_enabled(x.device.type) and not dropping else x.to(adapter.A.dtype)


class LoRA(nn.Module):
    """An adapter's parameters: A [r, in] (this rank's part, given), B [out, r] zero, output scale alpha / r."""

    def __init__(self, a: torch.Tensor, out_features: int, scale: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, a.shape[0], device=a.device))
        self.scale, self.dropout, self.enabled = scale, dropout, True
        # model-parallel size 1: fairscale's region mappings are identities, whose autograd wrappers cost ~13 us a call
        self.single = fs_init.get_model_parallel_world_size() == 1


class ColumnLoRA(LoRA):
    """Adapter of a column-parallel W [out / mp, in]: A [r, in] replicated, B [out / mp, r] split like W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x) [.., r], the input of B (the same on every rank)."""
        x = _adapter_input(self, x)
        if self.training and self.dropout > 0:
            x = _dropout(x, self.dropout, x.shape[-1], slice(None))
        z = F.linear(x, self.A)
        return z if self.single else copy_to_model_parallel_region(z)


class RowLoRA(LoRA):
    """Adapter of a row-parallel W [out, in / mp]: A [r, in / mp] split like W, B [out, r] replicated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _adapter_input(self, x)
        if self.training and self.dropout > 0:
            width, rank = x.shape[-1], fs_init.get_model_parallel_rank()
            x = _dropout(x, self.dropout, width * fs_init.get_model_parallel_world_size(),
                         slice(rank * width, (rank + 1) * width))
        z = F.linear(x, self.A)
        return z if self.single else reduce_from_model_parallel_region(z)  # sum over the ranks' input slices: A x


def _add_adapter(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
    """output + scale * B z, z = A dropout(x). Where z and the output share a dtype (autocast, or a float32 base) as
    one addmm: the scale and the sum ride on the matmul, where a product, its scaled copy and the sum were three
    passes over an [.., out] tensor (and the scale a fourth in the backward)."""
    lora = layer.lora
    if not lora.enabled:
        return None
    z = lora(inputs[0])
    if z.dtype != output.dtype:  # a bfloat16 base outside autocast: the adapter's product in its own dtype
        return output + (F.linear(z, lora.B) * lora.scale).to(output.dtype)
    return torch.addmm(output.flatten(0, -2), z.flatten(0, -2), lora.B.t(), alpha=lora.scale).view(output.shape)


class StackedAdapters:
    """The adapters of column-parallel layers that read one input and whose weights Transformer.fuse_projections stacks
    (wq|wk|wv, w1|w3), added at sampling to the fused matmul's output [.., sum of the layers' outputs] in two matmuls:
    z = [A_1; A_2; ..] x, then output + scale * blockdiag(B_1, B_2, ..) z, where the layers' hooks ran two small
    matmuls each (and the base three or two): PPO's rollouts and the evaluation sample from adapted policies. The
    stacked matrices are built again when an adapter changes (an optimizer step between rollouts: a parameter's
    _version) or is switched off (adapters_off). (apply_lora gives every adapter one scale.) Under dropout in training
    mode, each adapter runs as its hook does, its mask drawn in the same order."""

    def __init__(self, layers: list):
        self.layers = layers  # in the order their weights are stacked
        self.adapters = [getattr(layer, "lora", None) for layer in layers]  # (None: a layer without one)
        self.held: Optional[tuple] = None  # (key, A stacked [sum r, in], blockdiag B [sum out, sum r], their sources)

    def __call__(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        on = [a for a in self.adapters if a is not None and a.enabled]
        if not on:
            return output
        if any(a.training and a.dropout > 0 for a in on):
            return self._one_by_one(output, x)
        x = _adapter_input(on[0], x)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        a_stacked, b_blocks = self._stacked(on, dtype)
        scale = on[0].scale
        z = F.linear(x, a_stacked)
        z = z if on[0].single else copy_to_model_parallel_region(z)
        if z.dtype != output.dtype:  # a bfloat16 base outside autocast: the adapters' product in their own dtype
            return output + (F.linear(z, b_blocks) * scale).to(output.dtype)
        return torch.addmm(output.flatten(0, -2), z.flatten(0, -2), b_blocks.t(), alpha=scale).view(output.shape)

    def _stacked(self, on: list, dtype: torch.dtype) -> tuple:
        """A stacked and B's blocks in the dtype the matmuls run in (autocast's: held, where autocast would cast the
        float32 adapters at every call, the same numbers)."""
        key = (dtype, *(None if a is None else (a.enabled, *((t.data_ptr(), t._version) for t in (a.A, a.B)))
                        for a in self.adapters))
        if self.held is None or self.held[0] != key:
            a_stacked = torch.cat([a.A.detach() for a in on])
            b_blocks = torch.zeros(sum(layer.weight.shape[0] for layer in self.layers), len(a_stacked),
                                   dtype=on[0].B.dtype, device=on[0].B.device)
            row = col = 0
            for layer, a in zip(self.layers, self.adapters):
                if a is not None and a.enabled:
                    b_blocks[row:row + a.B.shape[0], col:col + a.B.shape[1]] = a.B.detach()
                    col += a.B.shape[1]
                row += layer.weight.shape[0]
            # (the adapters' tensors held too: their storage cannot be freed and its address handed to new values)
            self.held = (key, a_stacked.to(dtype), b_blocks.to(dtype), [t.detach() for a in on for t in (a.A, a.B)])
        return self.held[1:3]

    def _one_by_one(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = list(output.split([layer.weight.shape[0] for layer in self.layers], dim=-1))
        for i, (layer, a) in enumerate(zip(self.layers, self.adapters)):
            if a is not None and a.enabled:
                parts[i] = _add_adapter(layer, (x,), parts[i].contiguous())
        return torch.cat(parts, dim=-1)


def _initial_a(name: str, rank: int, in_features: int, seed: int, device) -> torch.Tensor:
    """The whole unsplit A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a = sqrt(5)), from a generator of
    its own: the same numbers at any model-parallel size and whatever else draws random numbers."""
    key = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)
    generator = torch.Generator().manual_seed(key)
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1).mul_(bound).to(device)


def parse_targets(targets: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in COLUMN + ROW]
    if not names or unknown:
        raise ValueError(f"lora_targets must name some of {', '.join(COLUMN + ROW)}, got {targets!r}")
    return names


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets: str = "wq,wk,wv,wo,w1,w2,w3",
               seed: int = 0, base_dir: str = "") -> None:
    """Freeze the model and attach fresh adapters to the target layers of every block (float32: they are trained)."""
    if rank < 1:
        raise ValueError(f"lora_rank must be positive, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    names = parse_targets(targets)
    if has_adapters(model):
        raise ValueError("this model has LoRA adapters already")
    for param in model.parameters():
        param.requires_grad_(False)
    mp = fs_init.get_model_parallel_world_size()
    mp_rank = fs_init.get_model_parallel_rank()
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for leaf in names:
                layer = getattr(parent, leaf, None)
                if layer is None:
                    continue
                name = f"layers.{block.layer_id}.{'attention' if parent is block.attention else 'feed_forward'}.{leaf}"
                out_features, in_features = layer.weight.shape
                device = layer.weight.device
                if leaf in COLUMN:
                    layer.lora = ColumnLoRA(_initial_a(name, rank, in_features, seed, device), out_features,
                                            alpha / rank, dropout)
                else:
                    full = _initial_a(name, rank, in_features * mp, seed, device)
                    layer.lora = RowLoRA(full[:, mp_rank * in_features:(mp_rank + 1) * in_features].contiguous(),
                                         out_features, alpha / rank, dropout)
                layer.register_forward_hook(_add_adapter)
        attention, ffn = block.attention, block.feed_forward  # at sampling, with the fused projections
        if any(hasattr(layer, "lora") for layer in (attention.wq, attention.wk, attention.wv)):
            attention.qkv_adapters = StackedAdapters([attention.wq, attention.wk, attention.wv])
        if any(hasattr(layer, "lora") for layer in (ffn.w1, ffn.w3)):
            ffn.w13_adapters = StackedAdapters([ffn.w1, ffn.w3])
    model.lora_config = {"base": os.path.abspath(base_dir) if base_dir else "", "base_params": architecture(model.args),
                         "rank": rank, "alpha": alpha, "dropout": dropout, "targets": ",".join(names)}


def has_adapters(model) -> bool:
    return getattr(model, "lora_config", None) is not None


@contextlib.contextmanager
def adapters_off(model):
    """The base model: every adapter skipped (the DPO and PPO reference when LoRA is on, with no second copy)."""
    adapters = [m for m in model.modules() if isinstance(m, (ColumnLoRA, RowLoRA))]
    for m in adapters:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapters:
            m.enabled = True


def is_adapter_key(key: str) -> bool:
    return ".lora." in key


def split_dim(key: str) -> Optional[int]:
    """The dimension along which an adapter tensor is split across model-parallel ranks (None: replicated)."""
    layer, _, which = key.rpartition(".lora.")
    leaf = layer.rsplit(".", 1)[-1]
    if which == "B" and leaf in COLUMN:
        return 0
    if which == "A" and leaf in ROW:
        return 1
    if which in ("A", "B") and leaf in COLUMN + ROW:
        return None
    raise CheckpointError(f"unknown adapter key {key!r}")


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def save_adapters(out_dir: str, model_parallel_rank: int, model) -> None:
    """This rank's adapter.NN.pth, and adapter_config.json from rank 0."""
    state = {k: v.detach().to("cpu").clone() for k, v in adapter_state(model).items()}
    atomic_write(os.path.join(out_dir, f"adapter.{model_parallel_rank:02d}.pth"), lambda tmp: torch.save(state, tmp))
    if model_parallel_rank == 0:
        write_json_atomic(os.path.join(out_dir, CONFIG), model.lora_config, indent=2)


def read_adapter_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: no {CONFIG} (not a LoRA adapter checkpoint)")
    with open(path) as f:
        return json.load(f)


def load_adapter_state(ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0) -> dict:
    """This rank's adapter tensors from adapter shards of any count (joined along their split dims and cut again)."""
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "adapter.*.pth")))
    numbers = sorted(int(SHARD_RE.search(p).group(1)) for p in paths if SHARD_RE.search(p))
    if not numbers or numbers != list(range(len(numbers))):
        raise CheckpointError(f"{ckpt_dir}: adapter shards missing (found {len(numbers)}: {numbers[:4]})")
    shards = [torch.load(os.path.join(ckpt_dir, f"adapter.{n:02d}.pth"), map_location="cpu", weights_only=True)
              for n in numbers]
    if len(shards) == model_parallel_size:
        return shards[model_parallel_rank]
    state = {}
    for key in shards[0]:
        dim = split_dim(key)
        full = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)
        state[key] = full if dim is None else torch.chunk(full, model_parallel_size, dim=dim)[model_parallel_rank]
    return state


def load_adapters(model, ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0) -> None:
    """Fill the model's adapters from an adapter checkpoint made for the same base and the same rank and targets."""
    config = read_adapter_config(ckpt_dir)
    mine = model.lora_config
    different = [k for k in ("rank", "targets", "base_params") if config.get(k) != mine.get(k)]
    if different:
        raise CheckpointError(f"{ckpt_dir}: adapters made with another {', '.join(different)} than this model's")
    state = load_adapter_state(ckpt_dir, model_parallel_size, model_parallel_rank)
    expected = adapter_state(model)
    if set(state) != set(expected):
        diff = sorted(set(state).symmetric_difference(expected))[:3]
        raise CheckpointError(f"{ckpt_dir}: adapter keys differ from this model's (e.g. {diff})")
    with torch.no_grad():
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise CheckpointError(f"{ckpt_dir}: {key} has shape {tuple(state[key].shape)}, expected "
                                      f"{tuple(target.shape)}")
            target.copy_(state[key])


def is_adapter_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, CONFIG))


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale B A in float32, stored in W's dtype. On one rank's parts (column: B split, A whole; row: A split,
    B whole) B A is exactly that rank's part of the unsplit product."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def load_model(ckpt_dir: str, model_parallel_size: int = 1, model_parallel_rank: int = 0,
               max_seq_len: Optional[int] = None, device="cpu", dtype=torch.float32, merge: bool = True):
    """checkpoint.load_model for a Meta-layout checkpoint, and for an adapter checkpoint: its base (itself possibly an
    adapter checkpoint) with the adapters merged into this rank's weights. What the trainers load, so that a LoRA
    run's output starts the next step as any checkpoint would.

    merge=False attaches the adapters instead (float32, frozen, as the run trained them) to a base in `dtype`: a
    bfloat16 base under autocast then computes what a bf16 LoRA run computed, where merging into bfloat16 weights
    would round away the part of the update below half a bfloat16 step of each weight. (A base that is itself an
    adapter checkpoint is merged into `dtype`.)"""
    if not is_adapter_checkpoint(ckpt_dir):
        return checkpoint.load_model(ckpt_dir, model_parallel_size, model_parallel_rank, max_seq_len, device=device,
                                     dtype=dtype)
    config = read_adapter_config(ckpt_dir)
    model = load_model(config["base"], model_parallel_size, model_parallel_rank, max_seq_len, device, dtype)
    if architecture(model.args) != config["base_params"]:
        raise CheckpointError(f"{config['base']}: its params.json differs from the base the adapters in {ckpt_dir} "
                              f"were trained on")
    if not merge:
        apply_lora(model, config["rank"], config["alpha"], 0.0, config["targets"], base_dir=config["base"])
        load_adapters(model, ckpt_dir, model_parallel_size, model_parallel_rank)
        for param in model.parameters():
            param.requires_grad_(False)
        return model
    adapters = load_adapter_state(ckpt_dir, model_parallel_size, model_parallel_rank)
    with torch.no_grad():
        for key in adapters:
            if key.endswith(".lora.A"):
                layer = key[:-len(".lora.A")]
                weight = model.get_parameter(layer + ".weight")
                weight.copy_(_merged(weight, adapters[key].to(weight.device), adapters[layer + ".lora.B"].to(
                    weight.device), config["alpha"] / config["rank"]))
    return model


def merged_state(ckpt_dir: str, base_dir: Optional[str] = None):
    """(args, the whole unsplit weights) of an adapter checkpoint with its adapters merged into its base."""
    config = read_adapter_config(ckpt_dir)
    base = base_dir or config["base"]
    args, state = merged_state(base) if is_adapter_checkpoint(base) else load_state(base, 1, 0)
    if architecture(args) != config["base_params"]:
        raise CheckpointError(f"{base}: its params.json differs from the base the adapters in {ckpt_dir} were "
                              f"trained on")
    adapters = load_adapter_state(ckpt_dir)
    for key in adapters:
        if key.endswith(".lora.A"):
            layer = key[:-len(".lora.A")]
            state[layer + ".weight"] = _merged(state[layer + ".weight"], adapters[key], adapters[layer + ".lora.B"],
                                               config["alpha"] / config["rank"])
    return args, state


def merge_lora(input_dir: str, output_dir: str, model_parallel_size: int = 1, base_dir: Optional[str] = None):
    """Write an adapter checkpoint as a Meta-layout one: W' = W + (alpha / r) B A for every adapted layer, computed in
    float32 and stored in the base's dtype. `base_dir` overrides the pointer in adapter_config.json."""
    base = base_dir or read_adapter_config(input_dir)["base"]
    if os.path.abspath(output_dir) in (os.path.abspath(base), os.path.abspath(input_dir)):
        raise ValueError(f"{output_dir}: write the merged checkpoint to a new directory")
    args, state = merged_state(input_dir, base_dir)
    os.makedirs(output_dir, exist_ok=True)
    save_checkpoint(output_dir, args, split_state(state, args, model_parallel_size))
    while is_adapter_checkpoint(base):  # the merged model carries its (first real) base's tokenizer
        base = read_adapter_config(base)["base"]
    checkpoint.copy_tokenizer_files(base, output_dir)
    if os.path.isfile(os.path.join(input_dir, "head.pth")):  # a reward model's head: the merge is a reward model
        shutil.copyfile(os.path.join(input_dir, "head.pth"), os.path.join(output_dir, "head.pth"))
    return args


def architecture(args) -> dict:
    """params.json's content that fixes the weights (max_seq_len is a run option): what ties adapters to a base."""
    return {k: v for k, v in model_params(args).items() if k != "max_seq_len"}
