"""Causal self-attention on a CPU as blocks of matmuls, with its own backward: what training forwards run there.

torch's fused CPU kernel (scaled_dot_product_attention, flash style) computes its blocks at a fraction of the matmul
rate: on SmolLM2's shapes (9 query heads over 3 kv heads, head dim 64) 4 x 512 tokens take 111 ms a layer forward and
backward on one thread of an AVX512-BF16 CPU without AMX, ~30% of the step. Here the queries go in blocks of
BLOCK_SIZE rows; block [s, e) reads keys [0, e) only (the causal skip) and, for a few (sequence, kv head) rows at a
time, its scores stay within BLOCK_SCORES floats (in cache). Per block, with q scaled by 1/sqrt(d):
    S = q k^T (future keys -inf),  lse = logsumexp(S),  P = exp(S - lse),  out = P v
and the backward recomputes P from the saved lse (nothing of size [T, T] is kept), with D = rowsum(dout * out):
    dv += P^T dout,  dP = dout v^T,  dS = P (dP - D),  dq = dS k / sqrt(d),  dk += dS^T q / sqrt(d).
The query heads that share a kv head are one matmul against it (grouped-query attention without repeating k and v).

Scores and probabilities are float32 between the matmuls; the matmuls run in the inputs' dtype, so in bfloat16 the
scores are rounded once to bfloat16 by their matmul and the probabilities once before theirs (the fused kernel rounds
the probabilities too). Measured (same machine, bf16, forward + backward, ms a layer, fused -> blocks): 1 thread
4 x 512 111 -> 72, 8 x 256 65 -> 41, 2 x 1024 134 -> 122; 2 threads 4 x 512 56 -> 36, 8 x 256 34 -> 23, 2 x 1024
67 -> 76; float32 1 thread 4 x 512 111 -> 87. So it is used up to MAX_LENGTH tokens, on CPUs without AMX (where the
fused kernel runs on AMX tiles; not measured against it), and never on GPUs."""

import torch

BLOCK_SIZE = 64  # query rows per block: small enough to skip most of the causal half, large enough for the matmuls
BLOCK_SCORES = 2 ** 20  # float32 scores computed per matmul (4 MB: a few (sequence, kv head) rows of one block)
MAX_LENGTH = 768  # above this the blocks' softmax passes over ever longer rows lose to the fused kernel


def _blocks(length: int):
    for start in range(0, length, BLOCK_SIZE):
        yield start, min(start + BLOCK_SIZE, length)


def _row_step(group: int, rows: int, keys: int) -> int:
    """(sequence, kv head) rows per matmul: BLOCK_SCORES scores, at least one."""
    return max(1, BLOCK_SCORES // (group * rows * keys))


def _scores(q_block, k_rows, start: int, end: int, shape):
    """S of one block as float32 [n, group, rows, end], the future keys of the diagonal part at -inf."""
    scores = torch.bmm(q_block, k_rows[:, :end].transpose(1, 2)).float().view(shape)
    future = torch.ones(end - start, end - start, dtype=torch.bool, device=scores.device).triu(1)
    scores[..., start:].masked_fill_(future, float("-inf"))
    return scores


class BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        """q [B, H, T, D], k and v [B, KV, T, D] (H a multiple of KV) -> [B, H, T, D]."""
        bsz, heads, length, head_dim = q.shape
        kv_heads = k.shape[1]
        group, n = heads // kv_heads, bsz * kv_heads
        q = q.contiguous()
        k_rows, v_rows = k.reshape(n, length, head_dim), v.reshape(n, length, head_dim)
        q_scaled = (q * head_dim ** -0.5).view(n, group, length, head_dim)
        out = torch.empty(n, group, length, head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(n, group, length, device=q.device)
        for start, end in _blocks(length):
            rows = end - start
            step = _row_step(group, rows, end)
            for a in range(0, n, step):
                b = min(a + step, n)
                q_block = q_scaled[a:b, :, start:end].reshape(b - a, group * rows, head_dim)
                scores = _scores(q_block, k_rows[a:b], start, end, (b - a, group, rows, end))
                top = scores.amax(dim=-1, keepdim=True)
                probs = scores.sub_(top).exp_()
                total = probs.sum(dim=-1, keepdim=True)
                lse[a:b, :, start:end] = (top + total.log())[..., 0]
                probs = probs.div_(total).to(q.dtype).view(b - a, group * rows, end)
                out[a:b, :, start:end] = torch.bmm(probs, v_rows[a:b, :end]).view(b - a, group, rows, head_dim)
        out = out.view(bsz, heads, length, head_dim)
        ctx.save_for_backward(q, k_rows, v_rows, out, lse)
        ctx.kv_heads = kv_heads
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k_rows, v_rows, out, lse = ctx.saved_tensors
        bsz, heads, length, head_dim = q.shape
        n = k_rows.shape[0]
        group, scale = heads // ctx.kv_heads, head_dim ** -0.5
        q_scaled = (q * scale).view(n, group, length, head_dim)
        d_out = d_out.contiguous()
        d_rows = d_out.view(n, group, length, head_dim)
        d_sum = (d_out.float() * out.float()).sum(dim=-1).view(n, group, length)  # D = rowsum(dout * out)
        dq = torch.empty(n, group, length, head_dim, dtype=q.dtype, device=q.device)
        dk = torch.zeros(n, length, head_dim, device=q.device)  # float32 sums over blocks
        dv = torch.zeros(n, length, head_dim, device=q.device)
        for start, end in _blocks(length):
            rows = end - start
            step = _row_step(group, rows, end)
            for a in range(0, n, step):
                b = min(a + step, n)
                q_block = q_scaled[a:b, :, start:end].reshape(b - a, group * rows, head_dim)
                d_block = d_rows[a:b, :, start:end].reshape(b - a, group * rows, head_dim)
                scores = _scores(q_block, k_rows[a:b], start, end, (b - a, group, rows, end))
                probs = scores.sub_(lse[a:b, :, start:end, None]).exp_()
                dv[a:b, :end] += torch.bmm(probs.to(q.dtype).view(b - a, group * rows, end).transpose(1, 2), d_block)
                d_probs = torch.bmm(d_block, v_rows[a:b, :end].transpose(1, 2)).float().view(probs.shape)
                d_scores = probs.mul_(d_probs.sub_(d_sum[a:b, :, start:end, None]))
                d_scores = d_scores.to(q.dtype).view(b - a, group * rows, end)
                dq[a:b, :, start:end] = (torch.bmm(d_scores, k_rows[a:b, :end]) * scale).view(b - a, group, rows,
                                                                                               head_dim)
                dk[a:b, :end] += torch.bmm(d_scores.transpose(1, 2), q_block)
        shape = (bsz, ctx.kv_heads, length, head_dim)
        return dq.view(q.shape), dk.view(shape).to(q.dtype), dv.view(shape).to(q.dtype)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v; query head h reads kv head h // (H / KV)."""
    return BlockCausalAttention.apply(q, k, v)
