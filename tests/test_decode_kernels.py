"""The decode-step kernels (llama_mp/decode_kernels.c, loaded by llama_mp/decode_kernels.py): the batch-1
matrix-vector product, the single-query attention, the RMSNorm and the blocks of a batch-1 step, against float64
computations, torch's own rounding, the model's own ops, and themselves on other thread counts."""

import math
import platform
import shutil

import pytest
import torch

from llama_mp import decode_kernels as kernels
from conftest import random_state
from llama_mp.checkpoint import load_model
from llama_mp.lora import apply_lora
from llama_mp.model import KVCache, ModelArgs, Transformer, linear

BUILDABLE = platform.machine() in ("x86_64", "AMD64") and bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no kernel here: {kernels.unavailable()}")
DTYPES = [torch.bfloat16, torch.float32]


def levels(dtype) -> list[int]:
    """Every kernel this CPU can run for the dtype (AVX2, and AVX512 where it has it)."""
    return list(range(1, kernels._state["levels"].get(dtype, 0) + 1)) if kernels.library() is not None else []


@pytest.mark.skipif(not BUILDABLE, reason="needs x86-64 and a C compiler")
def test_the_kernel_builds_and_loads_where_there_is_a_compiler():
    assert kernels.unavailable() is None, kernels.unavailable()
    assert kernels.kernels()["float32"] in ("avx2", "avx512")


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (77, 93), (130, 576), (64, 1536), (260, 40)])
def test_matvec_equals_the_float64_product_within_float32_accumulation_and_one_rounding(dtype, rows, cols):
    """|y - w x| <= cols * 2^-24 * sum |w x| (float32 additions) + the output's one rounding (2^-8 relative in
    bfloat16, 2^-24 in float32), for every kernel this CPU runs; shapes with rows not a multiple of 4 or of the
    64-row blocks and cols not a multiple of the vector width exercise the tails."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    x = torch.randn(cols, generator=gen).to(dtype)
    exact = w.double() @ x.double()
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -24
    bound = unit * exact.abs() + (cols + 1) * 2 ** -24 * (w.double().abs() @ x.double().abs()) * (1 + unit)
    with torch.inference_mode():
        for level in levels(dtype):
            y = kernels.matvec(x, w, level)
            assert y.dtype == dtype and y.shape == (rows,)
            assert ((y.double() - exact).abs() <= bound).all(), (level, (y.double() - exact).abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_single_product_is_rounded_as_torch_rounds_it(dtype):
    """With one column, y = w * x: the product is exact in float32, so y must be torch's own rounding of it, bit for
    bit: round to nearest even into bfloat16, overflow to infinity, infinities and NaN kept."""
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(200, generator=gen) * 10.0 ** torch.randint(-3, 4, (200,), generator=gen),
                   torch.tensor([3.0e38, -3.0e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0])])
    w = w.to(dtype)[:, None]
    x = torch.tensor([1.0e-3 if dtype == torch.float32 else 1.7]).to(dtype)
    expected = (w.float()[:, 0] * x.float()).to(dtype)
    with torch.inference_mode():
        for level in levels(dtype):
            y = kernels.matvec(x, w, level)
            assert torch.equal(y.isnan(), expected.isnan())
            assert torch.equal(y[~y.isnan()], expected[~expected.isnan()]), level


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_result_does_not_depend_on_the_thread_count(dtype):
    """Every row is one thread's fixed sequence of operations: 1 thread and 2 give the same bits."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=gen).to(dtype)
    x = torch.randn(576, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            two = kernels.matvec(x, w)
            torch.set_num_threads(1)
            one = kernels.matvec(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_matvec_declines_what_it_does_not_compute():
    """None (the caller keeps torch's kernel) for autograd, a transposed weight, mixed or other dtypes, a wrong size."""
    w = torch.randn(8, 16)
    x = torch.randn(16)
    assert kernels.matvec(x, w) is None  # grad mode on
    with torch.inference_mode():
        assert kernels.matvec(x, w) is not None
        assert kernels.matvec(torch.randn(8), w.t()) is None
        assert kernels.matvec(x.to(torch.bfloat16), w) is None
        assert kernels.matvec(x.half(), w.half()) is None
        assert kernels.matvec(torch.randn(15), w) is None


def test_the_kernel_is_off_with_llama_mp_kernels_0(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLAMA_MP_KERNELS", "0")
    assert kernels.library() is None and kernels.unavailable() == "LLAMA_MP_KERNELS=0"
    with torch.inference_mode():
        assert kernels.matvec(torch.randn(16), torch.randn(8, 16)) is None


def attention_case(dtype, bsz=3, heads=6, kv_heads=2, dim=12, max_len=40, lengths=(1, 17, 40), seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, dim, generator=gen).to(dtype)
    keys_t = torch.randn(bsz + 1, kv_heads, dim, max_len, generator=gen).to(dtype)  # a cache with a spare row
    values = torch.randn(bsz + 1, kv_heads, max_len, dim, generator=gen).to(dtype)
    return q, keys_t, values, torch.tensor(lengths, dtype=torch.int64)


def float64_attention(q, keys_t, values, lengths):
    """softmax(q k^T / sqrt(d)) v per row over its first lengths[b] positions, query head h on kv head h // group; with
    the bound on a float32 computation of it: a score's error is at most dim * 2^-24 * sum_d |q_d k_d| / sqrt(d)
    (accumulation, plus the scaling's rounding), which changes each probability by a factor within exp(+-2 delta),
    and the weighted sum of values adds (len + 2) * 2^-24 * sum_l p_l |v_l|."""
    bsz, heads, dim = q.shape
    group = heads // keys_t.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    bound = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(bsz):
        n = int(lengths[b])
        for h in range(heads):
            k = keys_t[b, h // group, :, :n].double()  # [dim, n]
            v = values[b, h // group, :n].double()  # [n, dim]
            qd = q[b, h].double()
            p = torch.softmax(qd @ k * dim ** -0.5, dim=-1)
            out[b, h] = p @ v
            delta = (dim + 2) * 2 ** -24 * ((qd.abs() @ k.abs()) * dim ** -0.5).max()
            weighted = p @ v.abs()
            bound[b, h] = (math.exp(4 * delta) - 1) * weighted + (n + 4) * 2 ** -24 * weighted
    return out, bound


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, kv_heads", [(12, 6, 2), (64, 9, 3), (8, 4, 4)])
def test_attend_one_equals_the_float64_attention_within_float32_error_and_one_rounding(dtype, dim, heads, kv_heads):
    """Rows at different lengths (1 position, some, the whole cache), grouped query heads, head sizes that are and are
    not a multiple of the vector width; every kernel this CPU runs; bfloat16 adds its output's rounding (2^-8)."""
    q, keys_t, values, lengths = attention_case(dtype, heads=heads, kv_heads=kv_heads, dim=dim)
    exact, bound = float64_attention(q, keys_t, values, lengths)
    if dtype == torch.bfloat16:
        bound = bound * (1 + 2 ** -8) + 2 ** -8 * exact.abs()
    else:
        bound = bound + 2 ** -24 * exact.abs()
    with torch.inference_mode():
        for level in levels(torch.float32):
            out = kernels.attend_one(q, keys_t, values, lengths, level)
            assert out.dtype == dtype and out.shape == q.shape
            assert ((out.double() - exact).abs() <= bound).all(), (level, (out.double() - exact).abs().max())


@needs_kernel
def test_attend_one_does_not_depend_on_the_thread_count_and_ignores_positions_past_a_row():
    """1 thread and 2 give the same bits (enough work to take both); what lies past a row's length is never read."""
    q, keys_t, values, lengths = attention_case(torch.bfloat16, bsz=4, heads=9, kv_heads=3, dim=64, max_len=600,
                                                lengths=(600, 1, 333, 599))
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            two = kernels.attend_one(q, keys_t, values, lengths)
            torch.set_num_threads(1)
            one = kernels.attend_one(q, keys_t, values, lengths)
            keys_t[2, :, :, 333:] = float("nan")
            values[2, :, 333:] = float("nan")
            again = kernels.attend_one(q, keys_t, values, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, again)


@needs_kernel
@pytest.mark.parametrize("per_row", [False, True])
def test_decode_steps_take_the_kernels_and_equal_the_full_forward(world1, gqa_dir, per_row, monkeypatch):
    """A float32 model's decode steps (one token per row, rows at one position or each at its own) go through the
    kernels, and their logits equal a float64 full forward of each row to float32 accuracy (2^-16 of the largest
    logit: a wrong head, position or length is off by O(1))."""
    model = load_model(gqa_dir)
    model.fuse_projections()
    calls = {"attend_one": [], "matvec": [], "rms_norm": [], "decode_layers": []}
    for name in calls:
        real = getattr(kernels, name)

        def spy(*args, real=real, name=name, **kwargs):
            out = real(*args, **kwargs)
            calls[name].append(out is not None)
            return out
        monkeypatch.setattr(kernels, name, spy)
    gen = torch.Generator().manual_seed(2)
    lengths = [9, 5, 13] if per_row else [9, 9, 9]
    rows = [torch.randint(0, 64, (n + 3,), generator=gen) for n in lengths]
    cache = KVCache(model.args, 3, 32)
    with torch.inference_mode():
        prompt = torch.zeros(3, max(lengths), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            prompt[i, :n] = r[:n]
        model(prompt, torch.zeros(3, dtype=torch.long) if per_row else 0, cache)
        steps = []
        for t in range(3):
            position = torch.tensor(lengths) + t if per_row else lengths[0] + t
            steps.append(model(torch.stack([r[n + t] for r, n in zip(rows, lengths)])[:, None], position, cache))
        single = KVCache(model.args, 1, 32)  # batch 1: the all-blocks kernel and the matrix-vector kernel too
        model(rows[0][None, :lengths[0]], 0, single)
        alone = model(rows[0][None, lengths[0]:lengths[0] + 1], lengths[0], single)
    assert all(calls[name] and all(calls[name]) for name in calls), calls
    reference = model.double()
    with torch.no_grad():
        for i, (r, n) in enumerate(zip(rows, lengths)):
            full = reference(r[None].long())[0, n:n + 3]
            got = torch.cat([s[i] for s in steps]).double()
            assert (got - full).abs().max() <= 2 ** -16 * full.abs().max()
            if i == 0:
                assert (alone[0, 0].double() - full[0]).abs().max() <= 2 ** -16 * full.abs().max()


@pytest.mark.parametrize("problem", ["compiler fails", "cache not writable"])
def test_a_kernel_that_cannot_be_built_leaves_torchs_kernels_in_place(problem, tmp_path, monkeypatch):
    """No kernel, one reason, no exception: the model then runs torch's kernels (F.linear, the grouped attention)."""
    monkeypatch.setattr(kernels, "_state", {})
    if problem == "compiler fails":
        monkeypatch.setenv("CC", "false")
        monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path))
    else:
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path / "file" / "cache"))  # under a file: makedirs fails
    assert kernels.library() is None and kernels.unavailable()
    if platform.machine() in ("x86_64", "AMD64"):
        assert ("could not build" in kernels.unavailable()) == (problem == "compiler fails")
    with torch.inference_mode():
        x, w = torch.randn(16), torch.randn(8, 16)
        assert kernels.matvec(x, w) is None
        assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 1, 7), (2, 16), (5, 100)])
def test_rms_norm_equals_the_float64_norm_within_its_roundings(dtype, shape):
    """y = round(round(x / rms(x)) * w) with rms = sqrt(mean(x^2) + eps): the float32 sum of squares is within
    dim * 2^-24 relative (positive terms), the square root halves that, the division and root add two roundings, and
    the two roundings to the dtype add 2^-8 each in bfloat16 (2^-24 in float32)."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype)
    eps = 1e-5
    xd = x.double()
    exact = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -24
    scale_error = (shape[-1] / 2 + 4) * 2 ** -24
    bound = exact.abs() * ((1 + scale_error) * (1 + unit) ** 2 - 1)
    with torch.inference_mode():
        for level in levels(torch.float32):
            y = kernels.rms_norm(x, w, eps, level)
            assert y.dtype == dtype and y.shape == x.shape
            assert ((y.double() - exact).abs() <= bound).all(), (level, ((y.double() - exact).abs() / bound).max())


@needs_kernel
def test_llama_mp_kernels_avx2_makes_every_call_take_the_avx2_kernels(monkeypatch):
    """The comparison setting: the AVX2 kernels' very bits, whatever the CPU has beyond AVX2 (float32, where the AVX512
    matrix-vector kernel sums in another order, so that the check can tell the two apart)."""
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(130, 93, generator=gen), torch.randn(93, generator=gen)
    q, keys_t, values, lengths = attention_case(torch.float32, dim=64, heads=9, kv_heads=3)
    with torch.inference_mode():
        expected = (kernels.matvec(x, w, 1), kernels.attend_one(q, keys_t, values, lengths, 1),
                    kernels.rms_norm(x[None], w[0], 1e-5, 1))
        if 2 in levels(torch.float32):
            assert not torch.equal(kernels.matvec(x, w), expected[0])
        monkeypatch.setattr(kernels, "_state", {})
        monkeypatch.setenv("LLAMA_MP_KERNELS", "avx2")
        assert kernels.kernels() == {"bfloat16": "avx2", "float32": "avx2"}
        got = (kernels.matvec(x, w), kernels.attend_one(q, keys_t, values, lengths),
               kernels.rms_norm(x[None], w[0], 1e-5))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@needs_kernel
def test_llama_mp_kernels_avx2_makes_the_blocks_kernel_take_its_avx2_parts(world1, monkeypatch):
    model, x, new_cache, pos = block_case(torch.float32)
    expected = run_block(model, x, new_cache(), pos, one_call=True, level=1)
    if 2 in levels(torch.float32):
        assert not torch.equal(run_block(model, x, new_cache(), pos, one_call=True)[0], expected[0])
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLAMA_MP_KERNELS", "avx2")
    got = run_block(model, x, new_cache(), pos, one_call=True)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# sizes that leave every vector loop of the block a tail (40 and 72 columns, 5 query heads on 1 kv head of 8)
BLOCK_ARGS = dict(dim=40, n_layers=1, n_heads=5, n_kv_heads=1, hidden_dim=72, vocab_size=64, max_seq_len=32)


def block_case(dtype, pos=11, seed=0):
    """A random block in `dtype` with fused projections (as at sampling), a residual x [1, 1, dim] at position pos, and
    a maker of caches whose positions [0, pos) hold the same random keys and values (the rest NaN: never read)."""
    args = ModelArgs(**BLOCK_ARGS)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed))
    model.to(dtype).fuse_projections()
    gen = torch.Generator().manual_seed(seed + 1)
    keys = torch.randn(1, args.kv_heads, args.head_dim, pos, generator=gen)
    values = torch.randn(1, args.kv_heads, pos, args.head_dim, generator=gen)
    x = (torch.randn(1, 1, args.dim, generator=gen) * 2).to(dtype)

    def new_cache(cache_dtype=dtype):
        cache = KVCache(args, 1, args.max_seq_len, dtype=cache_dtype)
        cache.keys[0].fill_(float("nan"))
        cache.values[0].fill_(float("nan"))
        cache.keys[0][..., :pos] = keys.to(dtype)
        cache.values[0][:, :, :pos] = values.to(dtype)
        return cache
    return model, x, new_cache, pos


def run_block(model, x, cache, pos, one_call: bool, level=None):
    """The block at a decode step: through decode_layers (one call), or through its own ops (forward); -> the output
    and the cache's key and value rows written at pos."""
    block, freqs_cis = model.layers[0], model.freqs_cis[pos:pos + 1]
    with torch.inference_mode():
        if one_call:
            out = kernels.decode_layers(x.view(-1), [block.decode_weights(cache)],
                                        torch.view_as_real(freqs_cis).view(-1), pos, block.attention.n_local_heads,
                                        block.attention_norm.eps, level).view_as(x)
        else:
            out = block(x, freqs_cis, pos, cache, None, torch.tensor([pos + 1]))
    return out, cache.keys[0][0, :, :, pos].clone(), cache.values[0][0, :, pos].clone()


def float64_block(model, x, cache, pos):
    """The same block, cache and input in float64 (torch's ops: no kernel takes float64)."""
    model64 = Transformer(model.args)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return run_block(model64.double(), x.double(), cache, pos, one_call=False)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_layers_computes_the_blocks_own_ops(world1, dtype):
    """One call = the block's forward at a decode step: its output and the key and value it writes at pos.
    float32: within 2^-16 of the largest value of a float64 run of the same block (float32's 2^-24 amplified by sums of
    at most 72 terms and a softmax; a wrong head, position, rotation or rounding is off by O(1) or by bfloat16's
    2^-8). bfloat16: the key and value are the same bits as the block's own ops write (every op before them rounds as
    torch's), and each output is within one bfloat16 unit (2^-7 relative) of forward's: only silu's exp is not torch's,
    so an activation's rounding may flip by one unit, which moves an output by less than a unit of its own. Every
    kernel this CPU runs."""
    model, x, new_cache, pos = block_case(dtype)
    own = run_block(model, x, new_cache(), pos, one_call=False)
    exact = float64_block(model, x, new_cache(torch.float64), pos)
    for level in levels(dtype):
        got = run_block(model, x, new_cache(), pos, one_call=True, level=level)
        assert got[0].dtype == dtype and got[0].shape == x.shape
        if dtype == torch.float32:
            for g, e in zip(got, exact):
                assert (g.double() - e).abs().max() <= 2 ** -16 * e.abs().max(), level
        else:
            assert torch.equal(got[1], own[1]) and torch.equal(got[2], own[2]), level
            assert ((got[0].double() - own[0].double()).abs() <= 2 ** -7 * own[0].double().abs()).all(), level


@needs_kernel
def test_decode_layers_does_not_depend_on_the_thread_count_and_declines_what_it_does_not_compute(world1):
    model, x, new_cache, pos = block_case(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_block(model, x, new_cache(), pos, one_call=True)
        torch.set_num_threads(1)
        one = run_block(model, x, new_cache(), pos, one_call=True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    block, cache = model.layers[0], new_cache()
    weights = block.decode_weights(cache)
    cos_sin = torch.view_as_real(model.freqs_cis[pos:pos + 1]).view(-1)
    good = dict(x=x.view(-1), layers=[weights], cos_sin=cos_sin, pos=pos, heads=block.attention.n_local_heads,
                eps=1e-5)
    with torch.inference_mode():
        assert kernels.decode_layers(**good) is not None
        for change in [dict(x=x.view(-1).float()), dict(pos=model.args.max_seq_len), dict(pos=-1), dict(heads=4),
                       dict(cos_sin=cos_sin[:-2]), dict(layers=[]), dict(layers=[weights, weights[:-1]]),
                       dict(layers=[weights, weights[:6] + (weights[6].transpose(1, 2),) + weights[7:]]),
                       dict(layers=[weights[:4] + (weights[4][:-2],) + weights[5:]])]:
            assert kernels.decode_layers(**{**good, **change}) is None, change
    assert kernels.decode_layers(**good) is None  # autograd wanted


@needs_kernel
def test_a_batch_1_decode_step_keeps_adapters_the_block_kernel_would_skip(world1, gqa_dir):
    """LoRA on wo and w2 only (q/k/v and w1/w3 stay fused): the blocks' kernel is not used (it would skip the adapters'
    hooks) and the step equals the model's full forward, adapters included (non-zero, so that skipping them shows)."""
    model = load_model(gqa_dir)
    apply_lora(model, rank=4, alpha=8.0, targets="wo,w2")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora." in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.fuse_projections()
    assert model.layers[0].attention.wqkv is not None and model.layers[0].feed_forward.w13 is not None
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = model(tokens)[0, -1]
        cache = KVCache(model.args, 1, 32)
        model(tokens[:, :8], 0, cache)
        step = model(tokens[:, 8:], 8, cache)[0, 0]
    assert (step - full).abs().max() <= 2 ** -16 * full.abs().max()
