"""The blocked causal attention (llama_mp/causal_attention.py) against a float64 attention written out here, values and
gradients, and its use by the model's training forward."""

import pytest
import torch

from conftest import GQA_ARGS, random_state
from llama_mp import causal_attention
from llama_mp import model as model_module
from llama_mp.checkpoint import load_into
from llama_mp.model import ModelArgs, Transformer


def reference(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v in float64, k and v repeated over each kv head's query heads."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(2, 3) / q.shape[-1] ** 0.5
    length = q.shape[2]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def values_and_grads(attention, q, k, v, d_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    out.backward(d_out.to(out.dtype))
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


def inputs(dtype, bsz, heads, kv_heads, length, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(bsz, heads, length, head_dim), (bsz, kv_heads, length, head_dim), (bsz, kv_heads, length, head_dim),
              (bsz, heads, length, head_dim)]
    return [(2 * torch.randn(s, generator=gen)).to(dtype) for s in shapes]  # scores of a few units, as in real models


def relative_errors(got, expected):
    return [((g - e).norm() / e.norm()).item() for g, e in zip(got, expected)]


@pytest.mark.parametrize("heads, kv_heads, length, block_scores", [
    (4, 2, 2, 2 ** 20),     # two tokens
    (4, 2, 150, 2 ** 20),   # three blocks, the last one partial
    (6, 2, 64, 2 ** 20),    # exactly one block
    (3, 3, 200, 2 ** 13),   # no grouping; one or two (sequence, kv head) rows per matmul, the last one alone
    (6, 1, 130, 10 ** 4),   # every head on one kv head; a row per matmul, all three in the short last block
])
def test_float32_values_and_gradients_equal_the_float64_attention(monkeypatch, heads, kv_heads, length, block_scores):
    monkeypatch.setattr(causal_attention, "BLOCK_SCORES", block_scores)
    q, k, v, d_out = inputs(torch.float32, 3, heads, kv_heads, length, 16)
    got = values_and_grads(causal_attention.block_causal_attention, q, k, v, d_out)
    expected = values_and_grads(reference, q.double(), k.double(), v.double(), d_out)
    # float32 arithmetic over sums of <= 200 terms: relative errors of order 1e-6 (a wrong mask or scale: > 1e-2)
    assert max(relative_errors(got, expected)) < 2e-5


def test_one_token_attends_to_itself():
    q, k, v, d_out = inputs(torch.float32, 2, 4, 2, 1, 8)
    out, dq, dk, dv = values_and_grads(causal_attention.block_causal_attention, q, k, v, d_out)
    torch.testing.assert_close(out, v.double().repeat_interleave(2, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(dv, d_out.double().view(2, 2, 2, 1, 8).sum(dim=2), rtol=1e-6, atol=1e-6)
    assert dk.abs().max() < 1e-5 and dq.abs().max() < 1e-5  # softmax of one score: no gradient to it


def test_bfloat16_is_as_accurate_as_the_fused_kernel():
    """Scores and softmax in float32; P, dP and dS rounded to bfloat16 once each (relative 2^-9) for their matmuls, and
    each matmul's output once: outputs and gradients within 4 roundings of the float64 attention of the same bfloat16
    inputs (measured 0.003-0.006 over seeds and shapes), and within 1.25x the fused kernel's error, which keeps S in
    float32 and rounds P (measured 0.63-1.07x). Scores rounded to bfloat16 as well give 2-5x the fused kernel's."""
    q, k, v, d_out = inputs(torch.bfloat16, 2, 6, 2, 300, 32, seed=1)
    expected = values_and_grads(reference, q.double(), k.double(), v.double(), d_out)
    got = values_and_grads(causal_attention.block_causal_attention, q, k, v, d_out)
    fused = values_and_grads(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, is_causal=True, enable_gqa=True), q, k, v, d_out)
    assert max(relative_errors(got, expected)) < 4 * 2 ** -9
    assert max(relative_errors(got, expected)) < 1.25 * max(relative_errors(fused, expected))


def test_the_training_forward_uses_the_blocks_on_a_cpu_and_equals_the_fused_kernel(monkeypatch, world1):
    """A model's causal forward and its gradients with the blocks equal the fused kernel's (float32), and the blocks
    were the ones used; with the dtype not listed the fused kernel runs."""
    torch.manual_seed(0)
    args = ModelArgs(**GQA_ARGS)
    model = Transformer(args)
    load_into(model, random_state(args, seed=3), "random")
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    calls = []
    original = causal_attention.block_causal_attention
    monkeypatch.setattr(causal_attention, "block_causal_attention", lambda *a: calls.append(1) or original(*a))

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(model_module, "BLOCK_ATTENTION_DTYPES", (torch.float32,))
    blocked = loss_and_grads()
    assert len(calls) == args.n_layers
    monkeypatch.setattr(model_module, "BLOCK_ATTENTION_DTYPES", ())
    fused = loss_and_grads()
    assert len(calls) == args.n_layers
    assert blocked[0] == pytest.approx(fused[0], rel=1e-6)
    for a, b in zip(blocked[1], fused[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
