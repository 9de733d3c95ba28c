"""Causal self-attention on a CPU as blocks of matmuls, with its own backward: what training forwards run there.

torch's fused CPU kernel (scaled_dot_product_attention, flash style) computes its blocks at a fraction of the matmul
rate: on SmolLM2's shapes (9 query heads over 3 kv heads, head dim 64) 4 x 512 tokens take ~105 ms a layer forward and
backward on one thread of an AVX512-BF16 CPU without AMX, ~30% of a LoRA step. Here the queries go in blocks of
BLOCK_SIZE rows; block [s, e) reads keys [0, e) only (the causal skip), a few (sequence, kv head) rows at a time so
that its scores stay within BLOCK_SCORES (in cache). Per block, with q scaled by 1/sqrt(d):
    S = q k^T (future keys -inf),  P = softmax(S),  out = P v
and the backward recomputes S and P (nothing of size [T, T] is kept; only q, k and v are saved):
    dv += P^T dout,  dP = dout v^T,  dS = P (dP - rowsum(dP P)),  dq = dS k / sqrt(d),  dk += dS^T q / sqrt(d).
The softmax and its backward are torch's fused kernels: one pass each over the block's scores. The query heads that
share a kv head are one matmul against it (grouped-query attention without repeating k and v).

In bfloat16 the scores and the softmax are float32 (q and k widened: the two score matmuls run in float32, the other
five in bfloat16 on P, dP and dS rounded once each), as accurate as the fused kernel, which keeps S in float32 and
rounds P: against a float64 attention of the same bf16 inputs (4 x 512, scores of a few units) the output is within
2.2e-3 (fused 1.8e-3) and dq, dk, dv within 2.9e-3, 3.3e-3, 2.8e-3 (fused 3.6e-3, 6.2e-3, 5.8e-3). A first version
rounded the scores to bf16 too: 1.3x faster, but 2-5x the fused kernel's error, and a small PPO run it trained ran
away in 2 of 10 seeds where the fused kernel's did not (tests/test_ppo.py). float32 is float32 throughout.

Measured on an AMD EPYC Zen 4 (AVX512-BF16, no AMX), bf16, forward + backward, ms a layer, fused kernel -> blocks:
1 thread: 4 x 512 105 -> 61, 2 x 1024 130 -> 109; 2 threads: 8 x 256 33 -> 21, 8 x 512 109 -> 66, 2 x 1024 66 ->
61, 1 x 2048 134 -> 120; float32: 1 thread 4 x 512 110 -> 79, 2 threads 2 x 1024 81 -> 74. (The rows of a block are
split evenly over its matmuls: 6 rows as 5 + 1 left the second matmul one row for two threads, and 2 x 1024 at 80
ms.) So model.py uses it on CPUs without AMX, where the fused kernel runs on AMX tiles (not measured against it), and
never on GPUs."""

import torch

BLOCK_SIZE = 64  # query rows per block: small enough to skip most of the causal half, large enough for the matmuls
BLOCK_SCORES = 2 ** 20  # scores per matmul: a few (sequence, kv head) rows of one block


def _blocks(q_float, k_float):
    """Per query block and per few (sequence, kv head) rows: (rows a:b, block start:end, float32 P [b - a, group x
    (end - start), end]), P = softmax of the block's scores over keys [0, end), the diagonal part's future keys masked.
    The forward and the backward walk the same blocks and compute the same P (the backward recomputes it)."""
    n, group, length, head_dim = q_float.shape
    for start in range(0, length, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, length)
        rows = end - start
        future = torch.ones(rows, rows, dtype=torch.bool, device=q_float.device).triu(1)
        most = max(1, BLOCK_SCORES // (group * rows * end))
        step = -(-n // -(-n // most))  # as many rows per matmul as the fewest matmuls allow, evenly (6 in 5s: 3 and 3)
        for a in range(0, n, step):
            b = min(a + step, n)
            scores = torch.bmm(q_float[a:b, :, start:end].reshape(b - a, group * rows, head_dim),
                               k_float[a:b, :end].transpose(1, 2))
            scores.view(b - a, group, rows, end)[..., start:].masked_fill_(future, float("-inf"))
            yield a, b, start, end, torch.softmax(scores, dim=-1)


class BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        """q [B, H, T, D], k and v [B, KV, T, D] (H a multiple of KV) -> [B, H, T, D]."""
        bsz, heads, length, head_dim = q.shape
        kv_heads = k.shape[1]
        group, n = heads // kv_heads, bsz * kv_heads
        q_scaled = (q * head_dim ** -0.5).reshape(n, group, length, head_dim)
        k_rows, v_rows = k.reshape(n, length, head_dim), v.reshape(n, length, head_dim)
        out = torch.empty(n, group, length, head_dim, dtype=q.dtype, device=q.device)
        for a, b, start, end, probs in _blocks(q_scaled.float(), k_rows.float()):
            out[a:b, :, start:end] = torch.bmm(probs.to(q.dtype), v_rows[a:b, :end]).view(b - a, group, end - start,
                                                                                           head_dim)
        ctx.save_for_backward(q_scaled, k_rows, v_rows)  # (bf16 stays bf16: the float32 copies are made again)
        ctx.kv_heads = kv_heads
        return out.view(bsz, heads, length, head_dim)

    @staticmethod
    def backward(ctx, d_out):
        q_scaled, k_rows, v_rows = ctx.saved_tensors
        n, group, length, head_dim = q_scaled.shape
        d_rows = d_out.reshape(n, group, length, head_dim)
        dq = torch.empty_like(q_scaled)
        dk = torch.zeros(k_rows.shape, device=k_rows.device)  # float32 sums over the blocks
        dv = torch.zeros(v_rows.shape, device=v_rows.device)
        for a, b, start, end, probs in _blocks(q_scaled.float(), k_rows.float()):
            rows = group * (end - start)
            q_block = q_scaled[a:b, :, start:end].reshape(b - a, rows, head_dim)
            d_block = d_rows[a:b, :, start:end].reshape(b - a, rows, head_dim)
            dv[a:b, :end] += torch.bmm(probs.to(q_block.dtype).transpose(1, 2), d_block)
            d_probs = torch.bmm(d_block, v_rows[a:b, :end].transpose(1, 2)).float()
            d_scores = torch._softmax_backward_data(d_probs, probs, -1, torch.float32).to(q_block.dtype)
            dq[a:b, :, start:end] = torch.bmm(d_scores, k_rows[a:b, :end]).view(b - a, group, end - start, head_dim)
            dk[a:b, :end] += torch.bmm(d_scores.transpose(1, 2), q_block)
        shape = (n // ctx.kv_heads, ctx.kv_heads, length, head_dim)
        return (dq.mul_(head_dim ** -0.5).view(shape[0], -1, length, head_dim), dk.view(shape).to(dq.dtype),
                dv.view(shape).to(dq.dtype))


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), causal) v; query head h reads kv head h // (H / KV)."""
    return BlockCausalAttention.apply(q, k, v)
