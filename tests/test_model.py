"""The transformer against independent expectations: a naive re-implementation, hand-computed sizes, llama2.c's text."""

import math

import pytest
import torch

from conftest import GQA_ARGS, STORIES_REFERENCE, random_state
from llama_mp import decode_kernels
from llama_mp import model as model_module
from llama_mp.checkpoint import load_into, load_model
from llama_mp.model import KVCache, ModelArgs, Transformer, linear
from llama_mp.sampler import Sampler


def naive_forward(state: dict, args: ModelArgs, tokens: list[int]) -> torch.Tensor:
    """LLaMA written out by hand, one position and one head at a time (float64): logits [T, V]."""
    s = {k: v.double() for k, v in state.items()}
    hd, kvh, nh = args.dim // args.n_heads, args.n_kv_heads or args.n_heads, args.n_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean() + args.norm_eps) * w

    def rope(vec, pos):  # rotate pairs (2i, 2i+1) by pos * theta^(-2i/hd)
        out = vec.clone()
        for i in range(hd // 2):
            angle = pos * args.rope_theta ** (-2 * i / hd)
            a, b = vec[2 * i], vec[2 * i + 1]
            out[2 * i], out[2 * i + 1] = a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)
        return out

    x = [s["tok_embeddings.weight"][t] for t in tokens]
    for layer in range(args.n_layers):
        p = f"layers.{layer}."
        normed = [rms(v, s[p + "attention_norm.weight"]) for v in x]
        q = [s[p + "attention.wq.weight"] @ v for v in normed]
        k = [s[p + "attention.wk.weight"] @ v for v in normed]
        v_ = [s[p + "attention.wv.weight"] @ v for v in normed]
        new_x = []
        for t in range(len(tokens)):
            heads = []
            for h in range(nh):
                g = h // (nh // kvh)  # the kv head this query head reads
                qh = rope(q[t][h * hd:(h + 1) * hd], t)
                scores = torch.stack([qh @ rope(k[j][g * hd:(g + 1) * hd], j) for j in range(t + 1)]) / math.sqrt(hd)
                weights = torch.softmax(scores, dim=0)
                heads.append(sum(weights[j] * v_[j][g * hd:(g + 1) * hd] for j in range(t + 1)))
            h_t = x[t] + s[p + "attention.wo.weight"] @ torch.cat(heads)
            f = rms(h_t, s[p + "ffn_norm.weight"])
            gate = s[p + "feed_forward.w1.weight"] @ f
            ffn = s[p + "feed_forward.w2.weight"] @ (gate * torch.sigmoid(gate) * (s[p + "feed_forward.w3.weight"] @ f))
            new_x.append(h_t + ffn)
        x = new_x
    out_w = s["tok_embeddings.weight"] if args.tie_embeddings else s["output.weight"]
    return torch.stack([out_w @ rms(v, s["norm.weight"]) for v in x])


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_naive_implementation(world1, tied):
    args = ModelArgs(**GQA_ARGS, tie_embeddings=tied)
    state = random_state(args, seed=3)
    model = Transformer(args)
    load_into(model, state, "random")
    tokens = [1, 5, 9, 33, 2, 60, 7]
    expected = naive_forward(state, args, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_ffn_hidden_dim_formula():
    # Llama-2-70B: 2/3 * 4 * 8192 = 21845 -> * 1.3 = 28398 -> rounded up to a multiple of 4096 = 28672
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672
    # Llama-2-7B: 2/3 * 4 * 4096 = 10922 -> multiple of 256 = 11008
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008
    assert ModelArgs(dim=64, multiple_of=4).ffn_hidden_dim == 172  # stories260K
    assert ModelArgs(dim=64, hidden_dim=100).ffn_hidden_dim == 100


def test_model_parallel_size_must_divide_kv_heads():
    with pytest.raises(ValueError, match=r"model-parallel size 3 must divide n_kv_heads \(2\)"):
        ModelArgs(**GQA_ARGS).check(3)


def test_stories260k_greedy_reproduces_llama2c(world1, stories_dir, tokenizer):
    model = load_model(stories_dir)
    completion = Sampler(model, tokenizer).generate(["Once upon a time"], 60, temperature=0.0)[0]
    assert "Once upon a time" + completion.text == STORIES_REFERENCE
    assert completion.finish_reason == "length" and len(completion.tokens) == 60


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    """The flags that choose bf16 (train.bf16_native) and the attention path for blocks of queries (AMX: the fused
    kernel), read from hand-written /proc/cpuinfo files."""
    x86 = tmp_path / "x86"
    flags = "flags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n"
    x86.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n{flags}\nprocessor\t: 1\n{flags}")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd4f\n")
    assert model_module.cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert model_module.cpu_flags(str(arm)) == {"fp", "asimd", "bf16", "i8mm"}
    assert model_module.cpu_flags(str(tmp_path / "missing")) == set()


# the cached forward's two attention paths (llama_mp/model.py) for blocks of queries, in the tests' float64: the fused
# kernel (float64 is not one of the grouped path's dtypes), the grouped matmul with the default chunks, and the
# grouped matmul one row at a time
ATTENTION_PATHS = {"fused": (2 ** 18, ()), "grouped": (2 ** 18, (torch.float64,)),
                   "grouped-row-chunks": (1, (torch.float64,))}


@pytest.fixture(params=list(ATTENTION_PATHS))
def attention_path(request, monkeypatch):
    chunk_scores, dtypes = ATTENTION_PATHS[request.param]
    monkeypatch.setattr(model_module, "CACHED_ATTENTION_CHUNK_SCORES", chunk_scores)
    monkeypatch.setattr(model_module, "CACHED_ATTENTION_DTYPES", dtypes)
    return request.param


@pytest.mark.parametrize("which", ["gqa", "stories"])
def test_kv_cache_decoding_equals_full_recomputation(world1, gqa_dir, stories_dir, which, attention_path):
    # float64: the cached forward must equal the full one up to summation order (~1e-15 relative), whichever
    # attention path it takes; in float32 the two orders differ by a few ulps of logits of magnitude ~20
    model = load_model(gqa_dir if which == "gqa" else stories_dir).double()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.args.vocab_size, (3, 20), generator=gen)
    cache = KVCache(model.args, 3, 32, dtype=torch.float64)
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :7], 0, cache)  # a multi-token block, then one token at a time
        steps = [model(tokens[:, t:t + 1], t, cache) for t in range(7, 12)]
        block = model(tokens[:, 12:20], 12, cache)  # a multi-token block on top of a filled cache
    torch.testing.assert_close(torch.cat([prefill, *steps, block], dim=1), full, atol=1e-12, rtol=0)


def test_per_row_cache_positions_equal_each_row_alone(world1, gqa_dir, attention_path):
    # rows of 9, 5 and 13 tokens fed in two right-padded blocks cut at different lengths, then one decode step at each
    # row's own position: every real position must give what a full forward of that row alone gives (float64)
    model = load_model(gqa_dir).double()
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 64, (n,), generator=gen) for n in (9, 5, 13)]
    cuts, last = [4, 2, 7], torch.randint(0, 64, (3, 1), generator=gen)
    cache = KVCache(model.args, 3, 32, dtype=torch.float64)

    def block(parts):
        out = torch.zeros(3, max(len(p) for p in parts), dtype=torch.long)
        for i, p in enumerate(parts):
            out[i, :len(p)] = p
        return out

    with torch.no_grad():
        first = model(block([r[:c] for r, c in zip(rows, cuts)]), torch.tensor([0, 0, 0]), cache)
        second = model(block([r[c:] for r, c in zip(rows, cuts)]), torch.tensor(cuts), cache)
        step = model(last, torch.tensor([len(r) for r in rows]), cache)
        for i, (r, c) in enumerate(zip(rows, cuts)):
            alone = model(torch.cat([r, last[i]])[None])[0]
            torch.testing.assert_close(first[i, :c], alone[:c], atol=1e-12, rtol=0)
            torch.testing.assert_close(second[i, :len(r) - c], alone[c:len(r)], atol=1e-12, rtol=0)
            torch.testing.assert_close(step[i, 0], alone[-1], atol=1e-12, rtol=0)


def test_training_forward_has_gradients_and_hidden_states(world1, gqa_dir):
    model = load_model(gqa_dir).train()
    tokens = torch.randint(0, 64, (2, 10))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 10, 32)
    torch.testing.assert_close(model.output(hidden), logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeps_two_tensors_and_equals_autograd_bit_for_bit(dtype):
    """The FFN's silu(gate) * up with its own backward: the values and gradients of autograd's two ops exactly, with
    gate and up alone kept for the backward (autograd keeps silu(gate) as well)."""
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 5, 24, generator=gen, dtype=torch.float64).mul(3).to(dtype) for _ in range(3))
    outs = []
    for fn in (model_module.swiglu, lambda g, u: torch.nn.functional.silu(g) * u):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(g, u)
        y.backward(grad)
        outs.append((y.detach(), g.grad, u.grad))
    for ours, autograd in zip(*outs):
        assert torch.equal(ours, autograd)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    kept = model_module.swiglu(g, u).grad_fn.saved_tensors
    assert len(kept) == 2 and kept[0] is g and kept[1] is u
    with torch.no_grad():  # no graph: the plain ops
        assert model_module.swiglu(g, u).grad_fn is None


def test_autocast_casts_a_norm_output_once_with_the_same_forward(world1, gqa_dir, monkeypatch):
    """Under bf16 autocast a block's norm outputs reach its projections in bf16, cast once: the same logits, bit for
    bit, as autocast casting the float32 outputs for each projection (its summed gradients round differently)."""
    model = load_model(gqa_dir).train()
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    inputs = []
    monkeypatch.setattr(model.layers[0].attention.wq, "forward", lambda x, f=model.layers[0].attention.wq.forward:
                        inputs.append(x.dtype) or f(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once = model(tokens)
        monkeypatch.setattr(model_module, "matmul_input", lambda x: x)
        per_projection = model(tokens)
    assert inputs == [torch.bfloat16, torch.float32]
    assert torch.equal(once, per_projection)


def test_fused_projections_sample_the_same_follow_in_place_updates_and_stay_out_of_uncached_forwards(world1, gqa_dir):
    model = load_model(gqa_dir)
    tokens = torch.randint(0, 64, (2, 9))

    def sampled(m):  # the sampler's forwards: a prefill into a KV cache, then one decode step
        cache = KVCache(m.args, 2, 16)
        return torch.cat([m(tokens[:, :8], 0, cache), m(tokens[:, 8:], 8, cache)], dim=1)

    with torch.no_grad():
        before, plain = sampled(model), model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_bf16 = model(tokens)
        model.fuse_projections()
        assert model.layers[0].attention.wqkv is not None
        torch.testing.assert_close(sampled(model), before, atol=1e-6, rtol=1e-6)
        # without a cache (training, scoring, PPO's log-probs against an unfused reference copy): the layers' own
        # matmuls, bit for bit, in float32 and under bf16 autocast
        assert torch.equal(model(tokens), plain)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(tokens), plain_bf16)
        # the routing itself: a changed fused buffer changes what is sampled, not the uncached forward
        attention = model.layers[0].attention
        kept, attention.wqkv = attention.wqkv, attention.wqkv * 2
        assert not torch.allclose(sampled(model), before) and torch.equal(model(tokens), plain)
        attention.wqkv = kept
        model.layers[1].feed_forward.w3.weight.mul_(0.5)  # e.g. an optimizer step
        model.layers[0].attention.wk.weight.add_(0.1)
        fused = sampled(model)
    for layer in model.layers:
        layer.attention.wqkv = layer.feed_forward.w13 = None
    with torch.no_grad():
        torch.testing.assert_close(fused, sampled(model), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(fused, before)
    assert model(tokens).requires_grad  # training takes the unfused, autograd path


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shape", [(40,), (1, 40), (1, 1, 40), (3, 1, 40)])
def test_linear_of_a_bfloat16_row_equals_the_float64_product_to_bfloat16_rounding(shape, kernel, monkeypatch):
    """model.linear takes llama_mp/decode_kernels.py's kernel for one row at inference where it could be built, F.linear
    otherwise (kernel=False: as if it could not): either way the result is the float64 product after a float32
    accumulation (error <= k * 2^-24 * sum |w x|) rounded once to bfloat16 (relative error <= 2^-8), in F.linear's
    shape."""
    if not kernel:
        monkeypatch.setattr(decode_kernels, "_state", {"lib": None, "why": "test", "levels": {}})
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen).to(torch.bfloat16)
    x = torch.randn(shape, generator=gen).to(torch.bfloat16)
    exact = x.double() @ weight.double().T
    bound = 2 ** -8 * exact.abs() + 40 * 2 ** -24 * (x.double().abs() @ weight.double().abs().T)
    with torch.inference_mode():
        out = linear(x, weight)
    assert out.shape == torch.nn.functional.linear(x, weight).shape and out.dtype == torch.bfloat16
    assert ((out.double() - exact).abs() <= bound).all()
    with torch.enable_grad():  # training keeps F.linear (and its autograd) unchanged
        w = weight.clone().requires_grad_()
        out = linear(x, w)
        out.float().sum().backward()
    assert torch.equal(out, torch.nn.functional.linear(x, w)) and w.grad is not None
