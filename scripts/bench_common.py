"""What the benchmark scripts share: the embedded checkpoint, and the same weights as a Hugging Face model."""

import os
import tempfile

from llama_mp.checkpoint import save_checkpoint, split_state
from llama_mp.convert import read_llama2c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_checkpoint() -> str:
    """stories260K converted to the Meta layout in a temporary directory."""
    ckpt_dir = tempfile.mkdtemp(prefix="bench_stories260K_")
    args, state = read_llama2c(os.path.join(ROOT, "data/llama2c/stories260K.bin"))
    save_checkpoint(ckpt_dir, args, split_state(state, args, 1))
    return ckpt_dir


def hf_model(model):
    """The same weights as a transformers LlamaForCausalLM (q/k rows permuted to its rotate-half RoPE layout)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         tie_word_embeddings=a.tie_embeddings, hidden_act="silu", attention_bias=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(config).eval()

    def permute(w, heads):  # interleaved pairs -> first half / second half per head
        return w.view(heads, a.head_dim // 2, 2, a.dim).transpose(1, 2).reshape(heads * a.head_dim, a.dim)

    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        new[q + "self_attn.q_proj.weight"] = permute(sd[p + "attention.wq.weight"], a.n_heads)
        new[q + "self_attn.k_proj.weight"] = permute(sd[p + "attention.wk.weight"], a.kv_heads)
        new[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        new[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        new[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        new[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    hf.load_state_dict(new, strict=False)
    return hf
