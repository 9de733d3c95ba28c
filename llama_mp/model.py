"""The LLaMA transformer (Meta architecture) with fairscale tensor parallelism.

One class serves inference and training:
  - inference: `forward(tokens, start_pos, cache)` appends keys/values to a `KVCache` and attends over it (a decode
    step on an x86 CPU through the C kernels of llama_mp/decode_kernels.py: one-row products, single-query attention,
    RMSNorm, and at batch 1 all the blocks in one call);
  - training: `forward(tokens)` without a cache is a plain causal forward with autograd;
  - `return_hidden=True` gives the final-norm hidden states instead of logits (scalar heads read them, and training
    losses take token log-probs from them through llama_mp/logprobs.py, never [batch, time, vocab] logits);
    `last_only=True` runs the output layer on the last position only (a sampler's prefill);
  - under torch.autocast the residual stream stays float32 and each block's two norm outputs go to the projections in
    bfloat16 (cast once); `activation_checkpointing` recomputes each block in the backward pass.
Tensor parallelism is expressed only by the layer classes: column-parallel wq/wk/wv/w1/w3/output, row-parallel wo/w2,
and a parallel embedding (split along the embedding dim, or along the vocabulary when the output is tied to it).
"""

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama_mp import causal_attention, decode_kernels


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            return set(" ".join(line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))).split())
    except (OSError, IndexError):
        return set()


# Attention against the KV cache at inference. Single queries (decode steps) on a CPU take the C kernel of
# llama_mp/decode_kernels.py (float32 arithmetic; each of torch's two tiny bfloat16 matmuls costs ~25 us a layer), else
# the grouped matmul of Attention.attend_cached. Blocks of queries take the grouped matmul on a CPU in bfloat16 /
# float16 while one row's scores (heads x new tokens x cached positions) stay within MAX, computed CHUNK scores at a
# time (the chunk stays in cache); longer blocks take Attention.attend (the fused kernel, which skips the causal half;
# from position 0 on a CPU without AMX, the blocked attention of llama_mp/causal_attention.py). Measured on
# SmolLM2's shapes, 1-2 threads, bf16, on an AMD CPU with AVX512-BF16 and no AMX: a judge's 11 suffixes of 90 tokens
# over 520 positions 22 -> 11 ms a layer, 4 x 256 over 512 17 -> 10 ms, 4 x 512 over 512 36 -> 31 ms, while 2 x 512
# over 1024 is 35 vs 49 ms for the fused kernel. With AMX the fused kernel wins every block (2 threads: 11 x 90 over
# 610 3.9 vs 5.4 ms, 1 x 512 over 512 0.9 vs 2.0 ms, 2 x 512 over 1024 3.9 vs 15.3 ms), so there blocks keep it; in
# float32 it ties or wins at every block anywhere.
CACHED_ATTENTION_MAX_SCORES = 2 ** 22
CACHED_ATTENTION_CHUNK_SCORES = 2 ** 18
CACHED_ATTENTION_DTYPES = () if "amx_bf16" in cpu_flags() else (torch.bfloat16, torch.float16)
# Causal self-attention without a cache (training forwards, teacher-forced scoring) on a CPU: the blocked matmuls of
# llama_mp/causal_attention.py where they were measured to beat the fused kernel (no AMX).
BLOCK_ATTENTION_DTYPES = () if "amx_bf16" in cpu_flags() else (torch.bfloat16, torch.float32)


@dataclass
class ModelArgs:
    """The fields of a Meta `params.json`, plus the ones this project adds: `hidden_dim`, `tie_embeddings`, and for
    imported real models `head_dim`, `rope_scaling` (Llama 3.1 style) and `rope_freq_divisors` (GGUF's rope_freqs)."""

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
    head_dim: Optional[int] = None  # per-head size when it is not dim // n_heads (filled in when None)
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: Optional[dict] = None
    rope_freq_divisors: Optional[list] = None  # head_dim // 2 numbers: each inverse frequency is divided by its own

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Validated ModelArgs: the architecture keys are required, every value must have the right type and range."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"missing key {missing[0]!r}")
        for key, value in params.items():
            optional = key in ("n_kv_heads", "ffn_dim_multiplier", "hidden_dim", "head_dim", "rope_scaling",
                               "rope_freq_divisors")
            if value is None and optional:
                continue
            if key == "rope_scaling":
                check_rope_scaling(value)
                continue
            if key == "rope_freq_divisors":
                if not (isinstance(value, list) and value and all(_is_number(v) and v > 0 for v in value)):
                    raise ValueError(f"rope_freq_divisors must be a list of positive numbers, got {value!r}")
                continue
            kind = cls._KINDS[key]
            ok = (isinstance(value, bool) if kind is bool else _is_number(value) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{key} must be {'a number' if kind is float else kind.__name__}, got {value!r}")
            if kind is not bool and value <= 0 and not (key == "vocab_size" and value == -1):
                raise ValueError(f"{key} must be positive, got {value!r}")
        return cls(**params)

    _KINDS = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "vocab_size": int, "multiple_of": int,
              "ffn_dim_multiplier": float, "norm_eps": float, "rope_theta": float, "max_seq_len": int,
              "hidden_dim": int, "tie_embeddings": bool, "head_dim": int}

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

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
        if self.dim % self.n_heads and self.head_dim == self.dim // self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads} (give head_dim explicitly)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_freq_divisors is not None and len(self.rope_freq_divisors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_divisors has {len(self.rope_freq_divisors)} numbers, head_dim "
                             f"{self.head_dim} needs {self.head_dim // 2}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        mp = model_parallel_size
        for name, size in [("n_kv_heads", self.kv_heads), ("n_heads", self.n_heads), ("dim", self.dim),
                           ("ffn hidden dim", self.ffn_hidden_dim), ("vocab_size", self.vocab_size)]:
            if size % mp:
                raise ValueError(f"model-parallel size {mp} must divide {name} ({size}); "
                                 f"choose a model-parallel size that divides {size}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """rope_scaling must be Llama 3.1's: exactly rope_type "llama3" and its four positive numbers."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling must be a dict with rope_type 'llama3', got {scaling!r}")
    keys = set(scaling) - {"rope_type"}
    if keys != set(LLAMA3_SCALING_KEYS):
        raise ValueError(f"rope_scaling needs exactly the keys {list(LLAMA3_SCALING_KEYS)}, got {sorted(keys)}")
    if not all(_is_number(scaling[k]) and scaling[k] > 0 for k in LLAMA3_SCALING_KEYS):
        raise ValueError(f"rope_scaling values must be positive numbers, got {scaling!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling high_freq_factor must exceed low_freq_factor, got {scaling!r}")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), except for one row without autograd on a CPU (a decode step at batch 1): there the
    matrix-vector kernel of llama_mp/decode_kernels.py reads the weights 2-4x as fast, where it could be built."""
    if x.numel() == x.shape[-1] and not torch.is_grad_enabled() and x.device.type == "cpu":
        y = decode_kernels.matvec(x, weight)
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def _fast_at_size_one(layer: type, plain_op: Callable) -> type:
    """fairscale's tensor-parallel layer, unchanged, except that at model-parallel size 1 (where its region mappings
    are identities) it calls the plain op directly: the autograd wrappers cost a fifth of a small model's decode step."""

    class Layer(layer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.single = get_model_parallel_world_size() == 1

        def forward(self, x):
            return plain_op(x, self.weight) if self.single else super().forward(x)

    Layer.__name__ = Layer.__qualname__ = layer.__name__
    return Layer


ColumnParallelLinear = _fast_at_size_one(fs_layers.ColumnParallelLinear, linear)
RowParallelLinear = _fast_at_size_one(fs_layers.RowParallelLinear, linear)
ParallelEmbedding = _fast_at_size_one(fs_layers.ParallelEmbedding, F.embedding)
VocabParallelEmbedding = _fast_at_size_one(fs_layers.VocabParallelEmbedding, F.embedding)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps), computed in float32, then scaled by the weight in the input's dtype
        if decode:  # a decode step: the C kernel where it applies (llama_mp/decode_kernels.py), the same two roundings
            out = decode_kernels.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def matmul_input(x: torch.Tensor) -> torch.Tensor:
    """A norm's float32 output as autocast's matmuls read it, cast once: autocast would cast it for every projection
    and adapter that reads it (six in a LoRA attention), keep each copy for the backward and cast each gradient back.
    The gradients of those readers are then summed in bfloat16 (rounding of the order of their own)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The inverse frequencies f_i = theta^(-2i/head_dim), [head_dim // 2] float32, as rescaled for long contexts."""
    head_dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if args.rope_scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **{k: args.rope_scaling[k] for k in LLAMA3_SCALING_KEYS})
    if args.rope_freq_divisors is not None:  # GGUF's rope_freqs.weight: the same rescaling, stored as divisors
        inv_freq = inv_freq / torch.tensor(args.rope_freq_divisors, dtype=torch.float32)
    return inv_freq


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's context extension: wavelengths shorter than old_ctx / high_freq_factor keep their frequency, those
    longer than old_ctx / low_freq_factor are slowed by `factor`, and the band between blends the two linearly in
    old_ctx / wavelength."""
    old_ctx = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < old_ctx / high_freq_factor, inv_freq, out)


def precompute_rope(inv_freq: torch.Tensor, max_len: int) -> torch.Tensor:
    """freqs_cis[t, i] = exp(1j * t * inv_freq[i]), [max_len, head_dim // 2] complex64."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] as complex numbers by freqs_cis [T, D/2] (Meta), or
    [B, T, D/2] when each row has its own positions."""
    x_complex = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_complex * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)


class KVCache:
    """Preallocated keys and values for every layer.

    keys are stored transposed, [batch, local kv heads, head_dim, max_len], so that a decode step's q @ k^T reads them
    contiguously; values are [batch, local kv heads, max_len, head_dim]."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        local_kv_heads = args.kv_heads // get_model_parallel_world_size()
        k_shape = (batch_size, local_kv_heads, args.head_dim, max_len)
        v_shape = (batch_size, local_kv_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.values = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
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
        self.wqkv: Optional[torch.Tensor] = None  # wq|wk|wv in one buffer, see Transformer.fuse_projections
        self.qkv_adapters: Optional[Callable] = None  # their LoRA adapters at sampling (lora.StackedAdapters)

    def forward(self, x, freqs_cis, start_pos, cache: Optional[KVCache], layer: int, mask,
                lengths: Optional[torch.Tensor] = None):
        """start_pos: the int position of x's first token, or a LongTensor [B, T] of every token's position (with a
        cache: rows at different lengths). lengths [B]: a decode step's (one token, a cache, no autograd) cache
        positions each row attends to, for the decode-step kernel."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None and cache is not None and not torch.is_grad_enabled():  # sampling: one matmul
            qkv = linear(x, self.wqkv)
            if self.qkv_adapters is not None:
                qkv = self.qkv_adapters(qkv, x)
            qkv = qkv.view(bsz, seqlen, -1, self.head_dim)  # heads: q's, then k's, then v's
            # q and k rotated in one call (elementwise: the same numbers as two calls, in half the small ops)
            qk = apply_rope(qkv[:, :, :self.n_local_heads + self.n_local_kv_heads], freqs_cis)
            q, k = qk.split([self.n_local_heads, self.n_local_kv_heads], dim=2)
            v = qkv[:, :, self.n_local_heads + self.n_local_kv_heads:]
        else:
            q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
            k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is None:
            out = self.attend(q, k, v, mask)
        else:
            if isinstance(start_pos, torch.Tensor):  # row b's tokens go to its own positions start_pos[b]
                end = mask.shape[-1]
                rows = torch.arange(bsz, device=x.device)[:, None]
                dtype = cache.keys[layer].dtype  # (autocast: bf16 keys into a float32 cache, as a slice copy casts)
                cache.keys[layer][rows, :, :, start_pos] = k.transpose(1, 2).to(dtype)  # indexed as [B, T, heads, D]
                cache.values[layer][rows, :, start_pos] = v.transpose(1, 2).to(dtype)
            else:
                end = start_pos + seqlen
                cache.keys[layer][:bsz, :, :, start_pos:end] = k.transpose(2, 3)
                cache.values[layer][:bsz, :, start_pos:end] = v
            if lengths is not None:  # a decode step: the C kernel where it applies (llama_mp/decode_kernels.py)
                out = decode_kernels.attend_one(q.reshape(bsz, self.n_local_heads, self.head_dim).contiguous(),
                                                cache.keys[layer], cache.values[layer], lengths)
                if out is not None:
                    return self.wo(out.view(bsz, 1, -1))
            keys_t, values = cache.keys[layer][:bsz, :, :, :end], cache.values[layer][:bsz, :, :end]
            grouped = seqlen == 1 or (q.device.type == "cpu" and q.dtype in CACHED_ATTENTION_DTYPES and
                                      self.n_local_heads * seqlen * end <= CACHED_ATTENTION_MAX_SCORES)
            if grouped and not torch.is_grad_enabled():
                out = self.attend_cached(q, keys_t, values, mask)
            else:
                # contiguous keys: the fused CPU kernel falls back to a ~5x slower path on strided ones
                out = self.attend(q, keys_t.transpose(2, 3).contiguous(), values, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(d) + mask) v; query head h reads kv head h // (n_heads / n_kv_heads). mask None: causal,
        or for a single query the whole cache (the fused kernel's causal mask is aligned to the first key)."""
        if (mask is None and q.device.type == "cpu" and q.dtype in BLOCK_ATTENTION_DTYPES
                and 1 < q.shape[2] == k.shape[2]):
            return causal_attention.block_causal_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=self.n_local_heads != self.n_local_kv_heads)

    def attend_cached(self, q, keys_t, values, mask=None):
        """attend() for a short block of queries against the KV cache at inference (decode steps, judge suffixes over a
        shared prefix, reused prefixes): the query heads that share a kv head are grouped into one matmul against the
        cache's transposed keys as they lie (no contiguous copy), a few rows at a time so that each chunk's scores stay
        within CACHED_ATTENTION_CHUNK_SCORES (decode steps: all rows at once). On CPU in bfloat16 this beats the fused
        kernel, which with a mask or a cache offset runs its blocks at a fraction of the matmul rate. mask [B, 1, T,
        end] (rows at their own positions): True where a query may attend. Otherwise (None, or the forward's [T, end]
        mask of an int start) the block is causal after the cached prefix: only the scores of its own last T
        positions are masked."""
        bsz, _, seqlen, head_dim = q.shape
        kv_heads, end = self.n_local_kv_heads, keys_t.shape[-1]
        per_row = mask is not None and mask.dim() == 4
        causal = None if per_row or seqlen == 1 else torch.ones(seqlen, seqlen, dtype=torch.bool,
                                                                 device=q.device).tril()
        group = self.n_local_heads // kv_heads
        q = q * head_dim ** -0.5
        out = torch.empty_like(q)
        step = bsz if seqlen == 1 else max(1, CACHED_ATTENTION_CHUNK_SCORES // (self.n_local_heads * seqlen * end))
        for first in range(0, bsz, step):
            rows = slice(first, first + step)
            n = min(step, bsz - first)
            scores = torch.matmul(q[rows].reshape(n, kv_heads, group * seqlen, head_dim), keys_t[rows])
            grouped = scores.view(n, kv_heads, group, seqlen, end)
            if per_row:
                grouped.masked_fill_(~mask[rows].unsqueeze(2), float("-inf"))
            elif causal is not None:
                grouped[..., end - seqlen:].masked_fill_(~causal, float("-inf"))
            # the softmax kernel computes bfloat16 in float32 and rounds its output to q's dtype (bit-equal to a float32
            # softmax then cast, 2-5x faster), as the fused kernel rounds its probabilities before their matmul
            probs = torch.softmax(scores, dim=-1)
            out[rows] = torch.matmul(probs, values[rows]).view(n, self.n_local_heads, seqlen, head_dim)
        return out


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward and recomputing silu(gate) there: autograd would keep
    silu(gate) as well, a third [tokens, hidden] tensor per block (378 MB of SmolLM2's bf16 step at 8 x 512). The same
    ops as autograd's, so the same roundings: d up = grad silu(gate), d gate = silu'(gate) grad up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the plain ops where no gradient is taken."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, init_method: Callable):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=init_method)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)
        self.w13: Optional[torch.Tensor] = None  # w1|w3 in one buffer, see Transformer.fuse_projections
        self.w13_adapters: Optional[Callable] = None  # their LoRA adapters at sampling (lora.StackedAdapters)

    def forward(self, x, fused: bool = False):
        if fused and self.w13 is not None and not torch.is_grad_enabled():
            gate_up = linear(x, self.w13)
            if self.w13_adapters is not None:
                gate_up = self.w13_adapters(gate_up, x)
            return self.w2(swiglu(*gate_up.chunk(2, dim=-1)))
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, init_method: Callable):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, init_method)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, init_method)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, start_pos, cache, mask, lengths=None):
        decode = lengths is not None
        h = x + self.attention(matmul_input(self.attention_norm(x, decode)), freqs_cis, start_pos, cache,
                               self.layer_id, mask, lengths)
        return h + self.feed_forward(matmul_input(self.ffn_norm(h, decode)), fused=cache is not None)

    def decode_weights(self, cache: KVCache, q8: Optional[decode_kernels.Q8Copies] = None) -> Optional[tuple]:
        """This block's tensors for llama_mp/decode_kernels.py's decode_layers (a batch-1 decode step in one call: the
        same ops and roundings as forward's, without its ~40 small torch ops), or None where that does not apply: the
        projections not fused (Transformer.fuse_projections: not sampling), tensor parallelism, or LoRA adapters (on
        the fused projections, or hooks on wo or w2). q8: the matrices' Q8_0 copies in their places."""
        attention, ffn = self.attention, self.feed_forward
        wqkv, w13, wo, w2 = attention.wqkv, ffn.w13, attention.wo, ffn.w2
        if wqkv is None or w13 is None or not (wo.single and w2.single) or wo._forward_hooks or w2._forward_hooks:
            return None
        if attention.qkv_adapters is not None or ffn.w13_adapters is not None:
            return None
        matrices = (wqkv, wo.weight, w13, w2.weight)
        if q8 is not None:
            matrices = tuple(q8(weight) for weight in matrices)
        return (self.attention_norm.weight, self.ffn_norm.weight, *matrices, cache.keys[self.layer_id][0],
                cache.values[self.layer_id][0])


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
        # A plain attribute, not a buffer: model.to(bfloat16) would drop the imaginary part of a complex buffer.
        self.freqs_cis = precompute_rope(rope_frequencies(args), args.max_seq_len)
        # Training: keep only each block's input and recompute the block in the backward pass (set by the Trainer).
        self.activation_checkpointing = False
        # Batch-1 decode steps reading Q8_0 copies of the matrices (set_decode_weights), else None: the weights
        self.q8_copies: Optional[decode_kernels.Q8Copies] = None

    def set_decode_weights(self, kind: str) -> None:
        """What a batch-1 decode step on a CPU reads: "model", the weights themselves; "q8_0", int8 copies of the
        blocks' matrices and the LM head, 32 weights to a float32 scale (llama_mp/decode_kernels.py), made at the first
        such step and again after a weight changes. A step's time is the bytes it reads, 1.125 a weight against
        bfloat16's 2; each weight, and each product's input, is then rounded once more, by at most 1/254 of its
        block's largest (bfloat16 rounds by up to 2^-9 of the number). Only where the one-call blocks apply
        (decode_one_row); elsewhere, and at batch sizes above 1, the weights are read."""
        if kind not in ("model", "q8_0"):
            raise ValueError(f"decode_weights must be 'model' or 'q8_0', got {kind!r}")
        self.q8_copies = decode_kernels.Q8Copies() if kind == "q8_0" else None

    def fuse_projections(self) -> None:
        """Store each layer's wq|wk|wv and w1|w3 weights in one buffer and make the weights views of it.

        Sampling (a forward with a KV cache, without grad) then runs one matmul where it ran three (or two), with no
        extra memory; in-place updates of the weights (loading, optimizer steps) write into the buffer, so both stay in
        sync. Every forward without a cache (training, scoring, log-probs) keeps the layers' own matmuls: a fused matmul
        may round differently, and the policy's log-probs must equal its unfused reference copy's bit for bit (PPO's
        first-step KL is exactly 0). Call it after the model has its final device and dtype (`.to()` makes new
        tensors and would break the link)."""
        for layer in self.layers:
            attention, ffn = layer.attention, layer.feed_forward
            # (LoRA adapters of these layers join the fused matmuls at sampling: lora.StackedAdapters)
            attention.wqkv = _share_storage([attention.wq, attention.wk, attention.wv])  # the layers' own calls
            ffn.w13 = _share_storage([ffn.w1, ffn.w3])

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0, cache: Optional[KVCache] = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] with last_only), float32.

        Without a cache the attention is causal over `tokens` alone (training, scoring). With a cache the new keys and
        values are written at [start_pos, start_pos + T) and attention covers [0, start_pos + T). With a cache,
        start_pos may be a LongTensor [B]: each row continues at its own position, its token t attending to
        [0, start_pos[b] + t] of its own row (a row shorter than T is right-padded: its pads are written past its
        end, where a later call overwrites them before anything attends to them).
        """
        bsz, seqlen = tokens.shape
        per_row = isinstance(start_pos, torch.Tensor)
        if per_row and cache is None:
            raise ValueError("per-row start positions need a KV cache")
        end = (int(start_pos.max()) if per_row else start_pos) + seqlen
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence end {end} exceeds max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        if torch.is_autocast_enabled(h.device.type):
            h = h.float()  # mixed precision: low-precision matmuls, a float32 residual stream (as with float32 weights)
        if self.freqs_cis.device != tokens.device:
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        mask = None  # plain causal (or a single query, which sees the whole cache)
        if per_row:
            start_pos = start_pos.to(tokens.device)[:, None] + torch.arange(seqlen, device=tokens.device)  # [B, T]
            freqs_cis = self.freqs_cis[start_pos]
            mask = torch.arange(end, device=tokens.device) <= start_pos[:, None, :, None]  # [B, 1, T, end]
        else:
            freqs_cis = self.freqs_cis[start_pos:end]
            if cache is not None and start_pos > 0 and seqlen > 1:
                # New queries see every cached position and the causal part of the new block.
                mask = torch.ones(seqlen, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)
        lengths = None  # a decode step: the cache positions each row attends to (its own position included)
        if cache is not None and seqlen == 1 and not torch.is_grad_enabled() and tokens.device.type == "cpu":
            if end > cache.max_len:
                raise ValueError(f"sequence end {end} exceeds the KV cache's length {cache.max_len}")
            lengths = start_pos[:, 0] + 1 if per_row else torch.full((bsz,), end, dtype=torch.long)
        out = self.decode_one_row(h, freqs_cis, cache, lengths) if lengths is not None and bsz == 1 else None
        if out is not None:
            h = out
        else:
            for layer in self.layers:
                if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                    h = checkpoint(layer, h, freqs_cis, start_pos, cache, mask, use_reentrant=False)
                else:
                    h = layer(h, freqs_cis, start_pos, cache, mask, lengths)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h, decode=lengths is not None)
        if return_hidden:
            return h
        if out is not None and self.q8_copies is not None and self.output.single:  # the head from its Q8_0 copy too
            logits = decode_kernels.matvec_q8(h.view(-1), *self.q8_copies(self.output.weight))
            if logits is not None:
                return logits.view(*h.shape[:-1], -1).float()
        return self.output(h).float()

    def decode_one_row(self, h: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache,
                       lengths: torch.Tensor) -> Optional[torch.Tensor]:
        """Every block of a batch-1 decode step in one call of llama_mp/decode_kernels.py's decode_layers (the blocks'
        own ops and roundings, without their ~40 small torch ops each), or None where it does not apply to some block
        (TransformerBlock.decode_weights) or here (autocast, no kernel): the blocks then run one by one."""
        layers = [layer.decode_weights(cache, self.q8_copies) for layer in self.layers]
        if any(weights is None for weights in layers):
            return None
        out = decode_kernels.decode_layers(h.view(-1), layers, torch.view_as_real(freqs_cis).view(-1),
                                           int(lengths[0]) - 1, self.args.n_heads, self.args.norm_eps)
        return None if out is None else out.view_as(h)


def _share_storage(linears: list[nn.Module]) -> torch.Tensor:
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start:start + rows]
        start += rows
    return fused
