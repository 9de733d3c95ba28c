"""The LLaMA transformer (Meta architecture) with fairscale tensor parallelism.

One class serves inference and training:
  - inference: `forward(tokens, start_pos, cache)` appends keys/values to a `KVCache` and attends over it;
  - training: `forward(tokens)` without a cache is a plain causal forward with autograd;
  - `return_hidden=True` gives the final-norm hidden states instead of logits (scalar heads read them).
Tensor parallelism is expressed only by the layer classes: column-parallel wq/wk/wv/w1/w3/output, row-parallel wo/w2,
and a parallel embedding (split along the embedding dim, or along the vocabulary when the output is tied to it).
"""

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn


@dataclass
class ModelArgs:
    """The fields of a Meta `params.json`, plus two this project adds (`hidden_dim`, `tie_embeddings`)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = -1  # -1 in Meta's files: taken from the checkpoint's embedding
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # RoPE table length and the longest sequence a KV cache holds
    hidden_dim: Optional[int] = None  # explicit SwiGLU hidden size (overrides multiple_of / ffn_dim_multiplier)
    tie_embeddings: bool = False  # output layer shares the token embedding (llama2.c checkpoints)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        return cls(**params)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def check(self, model_parallel_size: int = 1) -> None:
        """Raise ValueError with a plain sentence when these params cannot build a model at this model-parallel size."""
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        mp = model_parallel_size
        for name, size in [("n_kv_heads", self.kv_heads), ("n_heads", self.n_heads), ("dim", self.dim),
                           ("ffn hidden dim", self.ffn_hidden_dim), ("vocab_size", self.vocab_size)]:
            if size % mp:
                raise ValueError(f"model-parallel size {mp} must divide {name} ({size}); "
                                 f"choose a model-parallel size that divides {size}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rope(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle t * theta^(-2i/head_dim), each [max_len, head_dim // 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by position; cos/sin are [T, D/2] (Meta convention)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Preallocated keys/values for every layer: [batch, local kv heads, max_len, head_dim] each."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        local_kv_heads = args.kv_heads // get_model_parallel_world_size()
        shape = (batch_size, local_kv_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, init_method: Callable):
        super().__init__()
        mp = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_dim
        column = dict(bias=False, gather_output=False, init_method=init_method)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, **column)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, **column)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, **column)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True,
                                    init_method=init_method)

    def forward(self, x, cos, sin, start_pos: int, cache: Optional[KVCache], layer: int, mask):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            end = start_pos + seqlen
            cache.keys[layer][:bsz, :, start_pos:end] = k
            cache.values[layer][:bsz, :, start_pos:end] = v
            k, v = cache.keys[layer][:bsz, :, :end], cache.values[layer][:bsz, :, :end]
        # Grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seqlen > 1,
                                             enable_gqa=self.n_local_heads != self.n_local_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, init_method: Callable):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=init_method)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, init_method: Callable):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, init_method)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, init_method)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos, cache, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache, self.layer_id, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def no_init(tensor: torch.Tensor) -> torch.Tensor:
    """Leave the weight as allocated: it is about to be overwritten by a checkpoint."""
    return tensor


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, init_method: Callable = no_init):
        super().__init__()
        args.check(get_model_parallel_world_size())
        self.args = args
        if args.tie_embeddings:
            # Vocabulary-split embedding: each rank's rows are exactly its column-parallel output shard.
            self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, init_method=init_method)
        else:
            self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=init_method)
        self.layers = nn.ModuleList(TransformerBlock(i, args, init_method) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, gather_output=True,
                                           init_method=init_method)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] with last_only), float32.

        Without a cache the attention is causal over `tokens` alone (training, scoring). With a cache the new keys and
        values are written at [start_pos, start_pos + T) and attention covers [0, start_pos + T).
        """
        bsz, seqlen = tokens.shape
        end = start_pos + seqlen
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence end {end} exceeds max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        mask = None  # plain causal (or a single query, which sees the whole cache)
        if cache is not None and start_pos > 0 and seqlen > 1:
            # New queries see every cached position and the causal part of the new block.
            mask = torch.ones(seqlen, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, cache, mask)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()
