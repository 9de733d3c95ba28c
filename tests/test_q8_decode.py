"""Q8_0 decode weights (llama_mp/decode_kernels.py and .c, Transformer.set_decode_weights): the quantization by hand,
the matrix-vector kernel against a float64 evaluation of its specification, the blocks' one-call step and the model's
batch-1 steps against the model's own ops with the same Q8_0 products."""

import pytest
import torch

from llama_mp import decode_kernels as kernels
from llama_mp.checkpoint import load_model
from llama_mp.model import KVCache
from test_decode_kernels import DTYPES, block_case, levels, needs_kernel, run_block


def dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s q per block of 32, in float64: the matrix a Q8_0 copy stands for."""
    return q.double() * scales.double().repeat_interleave(32, dim=1)[:, :q.shape[1]]


def test_quantize_q8_0_by_hand():
    """Row 0: a block whose largest |w| is 1.27 (scale 0.01: 1.27 -> 127, -0.634 -> -63, 0.006 -> 1, 0.005 -> 0 (half
    to even)), then a short block of zeros (scale 0, numbers 0). Row 1: random; every weight within s / 2 of s q,
    every block's largest at +-127."""
    w = torch.zeros(2, 40)
    w[0, :5] = torch.tensor([1.27, -0.634, 0.006, 0.005, -1.27])
    w[1] = torch.randn(40, generator=torch.Generator().manual_seed(0))
    q, scales = kernels.quantize_q8_0(w)
    assert q.dtype == torch.int8 and q.shape == (2, 40) and scales.dtype == torch.float32 and scales.shape == (2, 2)
    assert scales[0, 0].item() == pytest.approx(0.01, rel=1e-6) and scales[0, 1].item() == 0.0
    assert q[0, :5].tolist() == [127, -63, 1, 0, -127] and not q[0, 5:].any()
    error = (dequantized(q, scales) - w.double()).abs()
    assert (error[1] <= scales[1].double().repeat_interleave(32)[:40] * (0.5 + 1e-6)).all()
    assert q[1, :32].abs().max() == 127 and q[1, 32:].abs().max() == 127


def float64_spec(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's specification evaluated apart: the input quantized per block of 32 in float32 as specified
    (t = max |x| / 127, xq = rint(x * (127 / max |x|))), the integer dot products exactly, their scaled sum in float64.
    -> (y, sum of |s t dot| per row: what float32's roundings of the sum are relative to)."""
    cols, x32 = q.shape[1], x.float()
    y, magnitude = torch.zeros(q.shape[0], dtype=torch.float64), torch.zeros(q.shape[0], dtype=torch.float64)
    for b, start in enumerate(range(0, cols, 32)):
        block = x32[start:start + 32]
        top = block.abs().max()
        inverse = torch.tensor(127.0) / top if top > 0 else torch.tensor(0.0)
        xq = (block * inverse).round().clamp(-127, 127).long()
        dot = (q[:, start:start + 32].long() * xq).sum(dim=1)  # exact
        term = scales[:, b].double() * (top / torch.tensor(127.0)).double() * dot.double()
        y, magnitude = y + term, magnitude + term.abs()
    return y, magnitude


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (77, 93), (130, 576), (64, 1536), (260, 40)])
def test_matvec_q8_equals_its_specification_within_float32_sums_and_one_rounding(dtype, rows, cols):
    """|y - spec| <= (blocks + 5) 2^-24 sum |terms| (each block's float32 scale product and multiply-add, the lanes'
    sum) + the output's one rounding, for every kernel this CPU runs and at 1 and 2 threads (equal bits); shapes with
    a last block shorter than 32 and row counts off the 64-row blocks exercise the tails. A wrong block, scale or
    sign is off by O(1)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    q, scales = kernels.quantize_q8_0(torch.randn(rows, cols, generator=gen))
    x = (torch.randn(cols, generator=gen) * 3).to(dtype)
    exact, magnitude = float64_spec(q, scales, x)
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -24
    bound = unit * exact.abs() + (cols // 32 + 6) * 2 ** -24 * magnitude * (1 + unit)
    threads = torch.get_num_threads()
    q8_levels = [level for level in (1, 2) if level <= kernels._state["lib"].q8_level()]
    try:
        with torch.inference_mode():
            for level in q8_levels:
                torch.set_num_threads(2)
                y = kernels.matvec_q8(x, q, scales, level)
                assert y.dtype == dtype and y.shape == (rows,)
                assert ((y.double() - exact).abs() <= bound).all(), (level, (y.double() - exact).abs().max())
                torch.set_num_threads(1)
                assert torch.equal(kernels.matvec_q8(x, q, scales, level), y)
    finally:
        torch.set_num_threads(threads)
    assert q8_levels and kernels.matvec_q8(x, q[:, :-1], scales) is None  # a shape its scales do not fit


def test_copies_follow_their_weights():
    """A copy is made once, and again after its weight changes in place (an optimizer step, a load)."""
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    copies = kernels.Q8Copies()
    first = copies(w)
    assert copies(w)[0] is first[0]
    with torch.no_grad():
        w.mul_(2)
    again = copies(w)
    assert torch.equal(again[0], first[0]) and torch.allclose(again[1], 2 * first[1])


def with_q8_products(monkeypatch, copies):
    """Every batch-1 product of the model's own ops (llama_mp.model.linear -> decode_kernels.matvec) from its weight's
    Q8_0 copy: the model's own ops with the products the Q8_0 steps compute."""
    matvec_q8 = kernels.matvec_q8
    monkeypatch.setattr(kernels, "matvec", lambda x, weight, level=None: matvec_q8(x, *copies(weight)))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_layers_with_q8_0_matrices_computes_the_blocks_own_ops(world1, dtype, monkeypatch):
    """One call with Q8_0 matrices = the block's own ops with the same Q8_0 products (decode_layers computes its
    products with the kernel tested above). bfloat16: the key and value written are the same bits (the ops before
    them round as torch's) and each output is within one bfloat16 unit of the block's (silu's exp, see
    test_decode_kernels). float32: within 2^-16 of the largest value (the RMSNorm's other summation order)."""
    model, x, new_cache, pos = block_case(dtype)
    copies = kernels.Q8Copies()
    block = model.layers[0]
    for level in [level for level in levels(dtype) if level <= kernels._state["lib"].q8_level()]:
        cache = new_cache()
        freqs_cis = model.freqs_cis[pos:pos + 1]
        with torch.inference_mode():
            out = kernels.decode_layers(x.view(-1), [block.decode_weights(cache, copies)],
                                        torch.view_as_real(freqs_cis).view(-1), pos, block.attention.n_local_heads,
                                        block.attention_norm.eps, level).view_as(x)
        got = (out, cache.keys[0][0, :, :, pos], cache.values[0][0, :, pos])
        with monkeypatch.context() as patch:
            with_q8_products(patch, copies)
            own = run_block(model, x, new_cache(), pos, one_call=False)
        if dtype == torch.float32:
            for g, o in zip(got, own):
                assert (g - o).abs().max() <= 2 ** -16 * o.abs().max(), level
        else:
            assert torch.equal(got[1], own[1]) and torch.equal(got[2], own[2]), level
            assert ((got[0].double() - own[0].double()).abs() <= 2 ** -7 * own[0].double().abs()).all(), level
        unquantized = run_block(model, x, new_cache(), pos, one_call=True, level=level)
        assert not torch.equal(unquantized[0], got[0])  # the copies were read, not the weights


@needs_kernel
def test_batch_1_steps_read_the_q8_0_copies_of_blocks_and_head(world1, gqa_dir, monkeypatch):
    """A float32 model set to q8_0: its batch-1 decode steps take decode_layers with Q8_0 matrices and the head's Q8_0
    product, and their logits equal the model's own ops with the same Q8_0 products (within 2^-16 of the largest
    logit) and differ from the unquantized steps (the copies were read); batch 2 still reads the weights."""
    model = load_model(gqa_dir)
    model.fuse_projections()
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))

    def steps(kind):
        model.set_decode_weights(kind)
        cache = KVCache(model.args, 2, 32)
        with torch.inference_mode():
            model(tokens[:, :8], 0, cache)
            return torch.cat([model(tokens[:, t:t + 1], t, cache)[0] for t in range(8, 12)])

    calls = []
    real_layers, real_head = kernels.decode_layers, kernels.matvec_q8
    monkeypatch.setattr(kernels, "decode_layers", lambda x, layers, *a, **k: calls.append(
        ("blocks", isinstance(layers[0][2], tuple))) or real_layers(x, layers, *a, **k))
    monkeypatch.setattr(kernels, "matvec_q8", lambda *a, **k: calls.append(("head", True)) or real_head(*a, **k))
    q8 = steps("q8_0")
    assert calls == [("blocks", True), ("head", True)] * 4
    plain = steps("model")
    copies = kernels.Q8Copies()
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "decode_layers", lambda *a, **k: None)  # the blocks' own ops, one by one
        with_q8_products(patch, copies)
        model.set_decode_weights("model")
        own = steps("model")
    assert (q8 - own).abs().max() <= 2 ** -16 * own.abs().max()
    assert not torch.equal(q8, plain)
    model.set_decode_weights("q8_0")
    calls.clear()
    with torch.inference_mode():
        model(tokens[:, :2].T.contiguous(), 0, KVCache(model.args, 2, 32))  # batch 2: no Q8_0
    assert calls == []
    with pytest.raises(ValueError, match="decode_weights"):
        model.set_decode_weights("q4_0")


@needs_kernel
def test_a_sampler_set_to_q8_0_decodes_batch_1_from_the_copies(world1, stories_dir, tokenizer, monkeypatch):
    """Sampler(decode_weights="q8_0") (what --decode_weights q8_0 builds): a one-prompt generation's decode steps take
    the blocks' kernel with Q8_0 matrices and the head's Q8_0 product; the default sampler reads the weights."""
    from llama_mp.sampler import Sampler
    calls = []
    real_layers, real_head = kernels.decode_layers, kernels.matvec_q8
    monkeypatch.setattr(kernels, "decode_layers", lambda x, layers, *a, **k: calls.append(
        ("blocks", isinstance(layers[0][2], tuple))) or real_layers(x, layers, *a, **k))
    monkeypatch.setattr(kernels, "matvec_q8", lambda *a, **k: calls.append(("head", True)) or real_head(*a, **k))
    for kind, expected in (("q8_0", {("blocks", True), ("head", True)}), ("model", {("blocks", False)})):
        calls.clear()
        sampler = Sampler(load_model(stories_dir), tokenizer, max_batch_size=1, decode_weights=kind)
        sampler.generate(["Once upon a time"], 4, temperature=0)
        assert calls and set(calls) == expected, (kind, calls)
    with pytest.raises(ValueError, match="decode_weights"):
        Sampler(load_model(stories_dir), tokenizer, decode_weights="q4_0")
