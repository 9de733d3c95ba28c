"""Log-probs of chosen tokens, read from final hidden states through the LM head in chunks of positions.

Training never needs logits for every position: SFT, DPO and PPO score response tokens only. So the callers select the
positions that predict response tokens first (a prompt position never reaches the LM head), and the head runs on
`chunk_size` of those rows at a time. The log-softmax has its own backward: with p = softmax(logits / T),
    d log p(target) / d logits = (onehot(target) - p) / T,
and each chunk's logits are recomputed there from the saved hidden states, so no more than one chunk's [rows, vocab]
logits exist at any moment (never [batch, time, vocab]), and nothing of that size is kept between forward and backward.
Logits come from the head's matmul in the compute dtype (bfloat16 under autocast); the log-softmax is float32.

Under tensor parallelism the head's weight is split along the vocabulary (the column-parallel output layer, or the
vocabulary-split embedding it is tied to): each rank computes the logits of its slice only and the pieces are combined
across the model-parallel group on [rows]-sized vectors:
    logsumexp = m + log sum_ranks exp(logsumexp_rank - m),   m = max over ranks of logsumexp_rank,
    logit[target] = the value on the rank whose slice holds the target, 0 elsewhere, summed;
and in the backward each rank's part of d hidden = d logits_rank @ weight_rank is summed over the group.
"""

import weakref
from typing import Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

# Rows per head call. 256 x 49152 float32 logits are 50 MB. SmolLM2 bf16, 1024 rows forward + backward, measured on
# an AVX512-BF16 CPU: chunks of 1024 / 512 / 256 / 128 rows 785 / 684 / 604 / 632 ms on 2 threads (1252 / 1107 /
# 1078 / 1124 on one): smaller chunks stay in cache and fault fewer fresh pages, smaller still starve the matmul.
CHUNK_SIZE = 256


def _all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if fs_init.get_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=fs_init.get_model_parallel_group())
    return x


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's if it is on, else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _LogitBuffers:
    """One chunk's logits, [chunk, V / mp] in the compute dtype and in float32, allocated once per call and reused by
    every chunk: a fresh buffer of that size is ~50-200 MB of new pages (tens of ms of page faults on these CPUs) per
    chunk, while the head's matmul itself takes ~150 ms."""

    def __init__(self, rows: int, weight: torch.Tensor, dtype: torch.dtype):
        shape = (rows, weight.shape[0])
        self.compute = torch.empty(shape, dtype=dtype, device=weight.device)
        self.float32 = self.compute if dtype == torch.float32 else torch.empty(shape, device=weight.device)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        """logits / T of `hidden` (already in the compute dtype) against `weight` (the same), float32, in the buffer:
        valid until the next call."""
        rows = hidden.shape[0]
        with torch.autocast(weight.device.type, enabled=False):
            torch.mm(hidden, weight.t(), out=self.compute[:rows])
        logits = self.float32[:rows]
        if logits.data_ptr() != self.compute.data_ptr():
            logits.copy_(self.compute[:rows])
        return logits if temperature == 1.0 else logits.div_(temperature)


_HEAD_CASTS: dict = {}  # (id(weight), dtype) -> (weak reference to the weight, its copy in dtype)


def head_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` (no gradient), copied into a buffer that is held while the weight lives: a fresh tensor of a
    head's size is ~100 MB of new pages per call (50-400 ms for SmolLM2's 49152 x 576 in float32 on these CPUs, and
    erratic), a copy into held memory ~5 ms. Callers that score a few rows at a time (a judge's suffixes, a tabular
    column's candidates) call this hundreds of times."""
    if weight.dtype == dtype:
        return weight
    key = (id(weight), dtype)
    held = _HEAD_CASTS.get(key)
    if held is None or held[0]() is not weight or (held[1].shape, held[1].device) != (weight.shape, weight.device):
        held = (weakref.ref(weight, lambda _, key=key: _HEAD_CASTS.pop(key, None)),
                torch.empty(weight.shape, dtype=dtype, device=weight.device))
        _HEAD_CASTS[key] = held
    with torch.no_grad():
        return held[1].copy_(weight)


def _target_slot(targets: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this rank's vocabulary slice, whether the target falls in it) per row."""
    local = targets - fs_init.get_model_parallel_rank() * weight.shape[0]
    mine = (local >= 0) & (local < weight.shape[0])
    return local.clamp(0, weight.shape[0] - 1), mine


def _chunk_forward(logits: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """(log p(target), logsumexp, entropy or None) for one chunk's float32 logits / T (overwritten: with
    z = logits - max, it becomes exp(z)), assembled across the vocabulary shards. The same arithmetic with and
    without the entropy, so that both give the very same log-probs (PPO's first ratio is exactly 1)."""
    slot, mine = _target_slot(targets, weight)
    picked_local = logits.gather(-1, slot[:, None])[:, 0]
    top_local = logits.amax(dim=-1)
    z = logits.sub_(top_local[:, None])
    entropy_part = None
    if with_entropy:  # H = logsumexp - sum p * logit; per shard: sum exp(z) * z, combined below
        exp_z = z.exp()
        entropy_part = (exp_z * z).sum(dim=-1)
    else:
        exp_z = z.exp_()
    sum_local = exp_z.sum(dim=-1)  # (the same kernels either way)
    lse_local = top_local + sum_local.log()
    top = _all_reduce(lse_local.clone(), dist.ReduceOp.MAX)
    lse = top + _all_reduce(torch.exp(lse_local - top)).log()
    picked = _all_reduce(torch.where(mine, picked_local, 0.0))
    entropy = None
    if with_entropy:  # sum_v p_v logit_v = sum over shards of exp(top_s - lse) (sum exp(z) z + top_s sum exp(z))
        scale = torch.exp(top_local - lse)
        entropy = lse - _all_reduce(scale * (entropy_part + top_local * sum_local))
    return picked - lse, lse, entropy


def _chunks(hidden, weight, targets, temperature: float, chunk_size: int, with_entropy: bool, dtype: torch.dtype):
    """_chunk_forward over chunk_size rows at a time (the forward of both the gradient and the statistics paths):
    the head's weight cast once to `dtype` (into its held buffer), one logits buffer for every chunk."""
    if not hidden.shape[0]:
        return
    w = head_weight(weight, dtype)
    buffers = _LogitBuffers(min(chunk_size, hidden.shape[0]), weight, dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        yield _chunk_forward(buffers.logits(hidden[rows].to(dtype), w, temperature), weight, targets[rows],
                             with_entropy)


class _ChosenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int, dtype: torch.dtype):
        chunks = list(_chunks(hidden, weight, targets, temperature, chunk_size, False, dtype))
        empty = hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, targets, torch.cat([c[1] for c in chunks]) if chunks else empty)
        ctx.dtype, ctx.temperature, ctx.chunk_size = dtype, temperature, chunk_size
        return torch.cat([c[0] for c in chunks]) if chunks else empty

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype, temperature, chunk = ctx.dtype, ctx.temperature, ctx.chunk_size
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = None  # float32 sum over chunks
        w = head_weight(weight, dtype)
        buffers = _LogitBuffers(min(chunk, hidden.shape[0]), weight, dtype)
        # Each chunk's weight gradient in the compute dtype goes into one held buffer, then into the float32 sum: a fresh
        # [V, dim] product and its float32 copy per chunk were ~100 ms of new pages each for SmolLM2's head.
        part = torch.empty(weight.shape, dtype=dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            g = grad[rows].float() / temperature
            # d logp / d logits = (onehot(target) - p) / T, times the incoming gradient (in place: one [rows, V] buffer)
            d_logits = buffers.logits(h, w, temperature).sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            slot, mine = _target_slot(targets[rows], weight)
            d_logits.scatter_add_(1, slot[:, None], torch.where(mine, g, 0.0)[:, None])
            if d_logits.data_ptr() != buffers.compute.data_ptr():
                d_logits = buffers.compute[:h.shape[0]].copy_(d_logits)  # into the compute dtype, in its buffer
            grad_hidden[rows] = d_logits @ w
            if part is not None:  # (a frozen head, e.g. under LoRA, skips this matmul)
                torch.mm(d_logits.T, h, out=part)
                grad_weight = part.to(torch.float32, copy=True) if grad_weight is None else grad_weight.add_(part)
        _all_reduce(grad_hidden)  # each rank's vocabulary slice gave its part of d hidden
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        elif ctx.needs_input_grad[1]:  # no rows
            grad_weight = torch.zeros_like(weight)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None


def chosen_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = CHUNK_SIZE, with_entropy: bool = False, head_dtype: Optional[torch.dtype] = None):
    """log softmax(output(hidden) / temperature)[target] per row: hidden [N, dim] final-norm states, targets [N] token
    ids -> [N] float32. with_entropy (no gradient): also the entropy [N] of each row's distribution. head_dtype: the
    head's matmul dtype (default: the compute dtype); float32 for log-probs that are compared across models, which
    bfloat16 logits would round by up to 0.06-0.12 per token at magnitudes of 16-32."""
    weight = model.output.weight
    dtype = head_dtype or _compute_dtype(weight)
    if not with_entropy:
        return _ChosenLogprobs.apply(hidden, weight, targets, temperature, chunk_size, dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("with_entropy is a statistic: compute it under torch.no_grad()")
    chunks = list(_chunks(hidden, weight, targets, temperature, chunk_size, True, dtype))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat([empty] + [c[0] for c in chunks]), torch.cat([empty] + [c[2] for c in chunks])


def response_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      chunk_size: int = CHUNK_SIZE, hidden: Optional[torch.Tensor] = None):
    """Log-probs of the response tokens of right-padded rows: tokens [B, T], mask [B, T] = 1 on response tokens.

    Returns (row [N], log p [N]) for the N response tokens in row-major order; token t of a row is predicted by the
    hidden state at t - 1, so only those positions go through the head."""
    if hidden is None:
        hidden = model(tokens, return_hidden=True)
    rows, cols = (mask[:, 1:] > 0).nonzero(as_tuple=True)  # targets at cols + 1, predicted at cols
    return rows, chosen_logprobs(model, hidden[rows, cols], tokens[rows, cols + 1], temperature, chunk_size)
