"""LoRA: fresh adapters leave the model unchanged, TP=2 equals TP=1, merged weights equal the adapter model, only the
adapters train, adapter checkpoints resume bit-exactly in bf16, PPO's reference is the base with adapters off, and
sampling, which stacks the adapters into the fused projections, computes what the layers' hooks compute."""

import json
import os

import pytest
import torch
from fairscale.nn.model_parallel import initialize as fs_init

from conftest import GQA4_ARGS, make_random_checkpoint, run_distributed
from llama_mp import decode_kernels, distributed, lora
from llama_mp.adamw import AdamW
from llama_mp.checkpoint import load_model, load_shard, resolve_checkpoint, shard_paths
from llama_mp.model import KVCache
from llama_mp.train import TrainConfig, Trainer, add_lora, backbone_dtype
from step0_coldstart.train_sft import collate, response_loss

TOKENS = torch.tensor([[1, 7, 22, 13, 40, 5, 9, 31], [1, 50, 3, 3, 8, 61, 2, 17]])


def random_b(model, seed: int) -> None:
    """Give every B random values (drawn whole, then cut like the layer's split), so the adapters do something."""
    mp, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".lora.B"):
                dim = lora.split_dim(name)
                shape = list(param.shape)
                if dim is not None:
                    shape[dim] *= mp
                full = 0.1 * torch.randn(shape, generator=gen)
                param.copy_(full if dim is None else full.chunk(mp, dim=dim)[rank])


def test_fresh_adapters_give_the_base_outputs_and_switch_off(world1, gqa_dir):
    model = load_model(gqa_dir)
    with torch.no_grad():
        base = model(TOKENS)
    lora.apply_lora(model, rank=4, alpha=8, targets="wq,wk,wv,wo,w1,w2,w3", base_dir=gqa_dir)
    adapters = {k: v for k, v in model.named_parameters() if lora.is_adapter_key(k)}
    assert len(adapters) == 2 * 7 * model.args.n_layers
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith(".A"))
    assert all(not v.requires_grad for k, v in model.named_parameters() if k not in adapters)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base)  # B = 0: the adapter adds exactly nothing
        random_b(model, seed=1)
        adapted = model(TOKENS)
        with lora.adapters_off(model):  # the DPO / PPO reference: the base, no second copy
            assert torch.equal(model(TOKENS), base)
    assert (adapted - base).abs().max() > 1e-3


def sft_examples(vocab: int, n: int = 8):
    gen = torch.Generator().manual_seed(2)
    return [{"prompt": [1] + torch.randint(3, vocab, (5,), generator=gen).tolist(),
             "response": torch.randint(3, vocab, (4 + i % 3,), generator=gen).tolist()} for i in range(n)]


def one_lora_step(ckpt_dir: str, out_dir: str, model_parallel_size: int):
    """Loss and adapter gradients (gathered) of a backward pass with dropout, then the loss and global gradient norm of
    one optimizer step of the shared loop, at this model-parallel size."""
    info = distributed.init(model_parallel_size)
    model = load_model(ckpt_dir, info.model_parallel_size, info.model_parallel_rank)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.2, base_dir=ckpt_dir)
    random_b(model, seed=3)  # (with B = 0 every A would have a zero gradient)
    examples = sft_examples(model.args.vocab_size)
    with torch.no_grad():
        eval_loss, _ = response_loss(model.eval(), collate(examples, "cpu"))
    model.fuse_projections()
    sampled = cached_logits(model, TOKENS)  # the sampling path: the stacked adapters of each rank's fused projections
    loss, _ = response_loss(model.train(), collate(examples, "cpu"))
    loss.backward()
    out = {"loss": loss.detach(), "eval_loss": eval_loss, "sampled": sampled}
    for key, param in model.named_parameters():
        if lora.is_adapter_key(key) and key.startswith("layers.1."):
            grad, dim = param.grad, lora.split_dim(key)
            if dim is not None and info.model_parallel_size > 1:
                parts = [torch.empty_like(grad) for _ in range(info.model_parallel_size)]
                torch.distributed.all_gather(parts, grad.contiguous())
                grad = torch.cat(parts, dim=dim)
            out[key] = grad
    model.zero_grad(set_to_none=True)
    config = TrainConfig(output_dir=out_dir, lr=1e-2, micro_batch_size=4, grad_accum=2, warmup_ratio=0.0,
                         precision="fp32", lora_rank=4)
    metrics = Trainer(model, model, examples, lambda b: collate(b, "cpu"), response_loss, config, info).train_step()
    out.update(step_loss=torch.tensor(metrics["loss"]), grad_norm=torch.tensor(metrics["grad_norm"]))
    return out


@pytest.mark.parametrize("base_dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)])
def test_an_adapted_layer_adds_scale_b_a_x(world1, gqa_dir, base_dtype, autocast):
    """Each way the hook adds the adapter (one addmm where the output and A x share a dtype; the float32 product cast
    to a bfloat16 base outside autocast), and the stacked adapters of the fused projections at sampling, against
    W x + (alpha / r) B A x in float64, within the compute dtype's rounding of the output."""
    model = load_model(gqa_dir, dtype=base_dtype)
    lora.apply_lora(model, rank=4, alpha=8, targets="w1", base_dir=gqa_dir)
    random_b(model, seed=3)
    layer = model.layers[0].feed_forward.w1
    with torch.no_grad():
        layer.lora.B.mul_(5)  # an adapter term of the base's size
    x = torch.randn(2, 5, layer.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(base_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = layer(x)
    a, b, w = (t.double() for t in (layer.lora.A, layer.lora.B, layer.weight))
    expected = x.double() @ w.T + 2.0 * (x.double() @ a.T @ b.T)
    bf16 = base_dtype == torch.bfloat16 or autocast
    # one bf16 rounding of the output and of the products' inputs: ~3 ulp of 2^-8; float32: ~1e-6
    tolerance = 3 * 2 ** -8 if bf16 else 1e-5
    assert got.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
    assert (expected - x.double() @ w.T).abs().max() > 10 * tolerance * expected.abs().max()  # the adapter counts
    # the same at sampling: w1|w3 fused, the adapter stacked (lora.StackedAdapters), w3 without one
    ffn = model.layers[0].feed_forward
    model.fuse_projections()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        gate, up = ffn.w13_adapters(torch.nn.functional.linear(x, ffn.w13), x).chunk(2, dim=-1)
    assert gate.dtype == got.dtype
    assert ((gate.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
    up_expected = x.double() @ ffn.w3.weight.double().T
    assert ((up.double() - up_expected).abs().max() / up_expected.abs().max()).item() < tolerance


def cached_logits(model, tokens):
    """The sampling path: a prefill of tokens[:, :-1] into a KV cache, then one decode step of the last token."""
    cache = KVCache(model.args, tokens.shape[0], tokens.shape[1], dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return torch.cat([model(tokens[:, :-1], 0, cache), model(tokens[:, -1:], tokens.shape[1] - 1, cache)], dim=1)


def unfused_logits(model, tokens):
    """The same through each adapted layer and its hook (the projections not fused: how sampling ran before)."""
    layers = model.layers
    fused = [(layer.attention.wqkv, layer.feed_forward.w13) for layer in layers]
    for layer in layers:
        layer.attention.wqkv = layer.feed_forward.w13 = None
    try:
        return cached_logits(model, tokens)
    finally:
        for layer, (wqkv, w13) in zip(layers, fused):
            layer.attention.wqkv, layer.feed_forward.w13 = wqkv, w13


def test_sampling_adds_the_stacked_adapters_to_the_fused_projections(world1, gqa_dir):
    """At sampling the adapters of wq|wk|wv and w1|w3 join the fused matmuls (lora.StackedAdapters): the logits
    equal those of each layer and its hook (float64, adapters too: the same sums in another order, ~1e-15), with an
    adapter-less layer in the stack (wk), switched off, after an optimizer step (as between PPO's rollouts), and
    under dropout in training mode (each adapter's mask drawn in the same order as the hooks draw them)."""
    model = load_model(gqa_dir, dtype=torch.float64)
    base = load_model(gqa_dir, dtype=torch.float64)
    base.fuse_projections()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.1, targets="wq,wv,wo,w1,w3", base_dir=gqa_dir)
    random_b(model, seed=4)
    model.double().eval().fuse_projections()  # the adapters in float64 too
    assert model.layers[0].attention.qkv_adapters is not None and model.layers[0].feed_forward.w13_adapters is not None
    stacked = cached_logits(model, TOKENS)
    torch.testing.assert_close(stacked, unfused_logits(model, TOKENS), atol=1e-12, rtol=0)
    assert (stacked - cached_logits(base, TOKENS)).abs().max() > 1e-2  # the adapters count
    with lora.adapters_off(model):
        torch.testing.assert_close(cached_logits(model, TOKENS), cached_logits(base, TOKENS), atol=1e-12, rtol=0)
    adapters = [p for name, p in model.named_parameters() if lora.is_adapter_key(name)]
    for param in adapters:  # one step of the trainers' optimizer (its in-place foreach updates)
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel()),
                                 dtype=param.dtype)
    AdamW([(adapters, 0.0)]).step(lr=0.05)
    updated = cached_logits(model, TOKENS)
    assert (updated - stacked).abs().max() > 1e-2
    torch.testing.assert_close(updated, unfused_logits(model, TOKENS), atol=1e-12, rtol=0)
    model.train()
    torch.manual_seed(5)
    dropped = cached_logits(model, TOKENS)
    torch.manual_seed(5)
    torch.testing.assert_close(dropped, unfused_logits(model, TOKENS), atol=1e-12, rtol=0)
    assert (dropped - updated).abs().max() > 1e-3  # dropout was on


def test_a_batch_1_decode_step_keeps_the_adapters(world1, gqa_dir):
    """Adapters on wq alone leave no hook on wo or w2; a batch-1 decode step must still not take the one-call blocks
    of llama_mp/decode_kernels.py, which read the fused weights only (float32: the fused matmul and the layers' own
    round differently, by ~1e-6 of the logits)."""
    if decode_kernels.library() is None:
        pytest.skip(f"the decode kernels are not built here: {decode_kernels.unavailable()}")
    model = load_model(gqa_dir)
    lora.apply_lora(model, rank=4, alpha=8, targets="wq", base_dir=gqa_dir)
    random_b(model, seed=5)
    with torch.no_grad():
        model.layers[0].attention.wq.lora.B.mul_(10)
    base = load_model(gqa_dir)
    base.fuse_projections()
    model.fuse_projections()
    tokens = TOKENS[:1]
    cache = KVCache(base.args, 1, 8)
    assert all(layer.decode_weights(cache) is not None for layer in base.layers)  # the base takes the one-call blocks
    adapted = cached_logits(model, tokens)[:, -1]  # the decode step
    assert (adapted - cached_logits(base, tokens)[:, -1]).abs().max() > 1e-2
    torch.testing.assert_close(adapted, unfused_logits(model, tokens)[:, -1], atol=1e-4, rtol=1e-4)


def test_model_parallel_2_equals_1_with_dropout(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    make_random_checkpoint(ckpt, seed=6, **GQA4_ARGS)
    single = one_lora_step(ckpt, str(tmp_path / "mp1"), 1)
    distributed.teardown()
    for rank in run_distributed(one_lora_step, 2, ckpt, str(tmp_path / "mp2"), 2, tmp_dir=str(tmp_path)):
        assert rank.keys() == single.keys() and len(single) == 5 + 2 * 7
        assert abs(float(single["loss"] - single["eval_loss"])) > 1e-3  # dropout was on
        for key, value in single.items():
            if key == "sampled":  # logits up to ~9: float32 sums split across ranks differ by ulps of the largest
                torch.testing.assert_close(rank[key], value, atol=1e-5 * value.abs().max().item(), rtol=0, msg=key)
            else:
                torch.testing.assert_close(rank[key], value, atol=1e-6, rtol=1e-5, msg=key)


def sft_trainer(stories_dir, tokenizer_examples, out_dir, info, precision="fp32", **overrides):
    config = TrainConfig(output_dir=out_dir, lr=5e-3, micro_batch_size=4, epochs=2, warmup_ratio=0.0, log_every=1,
                         precision=precision, lora_rank=4, lora_alpha=8, lora_targets="wq,wv,wo,w2", **overrides)
    torch.manual_seed(0)
    model = load_model(stories_dir, dtype=backbone_dtype(config, info.device))
    add_lora(model, config, stories_dir)
    return model, Trainer(model, model, tokenizer_examples, lambda b: collate(b, "cpu"), response_loss, config, info)


def test_adapter_checkpoints_merge_into_the_adapter_model(world1, stories_dir, tmp_path):
    examples = sft_examples(512, 8)
    model, trainer = sft_trainer(stories_dir, examples, str(tmp_path / "run"), world1)
    trainer.fit()
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert sorted(os.listdir(ckpt)) == ["adapter.00.pth", "adapter_config.json", "head.pth", "trainer_state.00.pth"]
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base"] == os.path.abspath(stories_dir) and config["rank"] == 4
    base = load_shard(shard_paths(stories_dir)[0])  # only the adapters trained
    for key, value in model.state_dict().items():
        if not lora.is_adapter_key(key) and key in base:
            assert torch.equal(value, base[key]), key
    assert any(v.abs().sum() > 0 for k, v in lora.adapter_state(model).items() if k.endswith(".B"))
    model.eval()
    with torch.no_grad():
        adapted = model(TOKENS)
        lora.merge_lora(str(ckpt), str(tmp_path / "merged"))
        merged = load_model(str(tmp_path / "merged"))
        torch.testing.assert_close(merged(TOKENS), adapted, atol=1e-5, rtol=1e-5)
        reloaded = load_model(stories_dir)
        lora.apply_lora(reloaded, rank=4, alpha=8, targets="wq,wv,wo,w2", base_dir=stories_dir)
        lora.load_adapters(reloaded, str(ckpt))
        assert torch.equal(reloaded.eval()(TOKENS), adapted)
        lora.merge_lora(str(ckpt), str(tmp_path / "merged2"), model_parallel_size=2)
        assert torch.equal(load_model(str(tmp_path / "merged2"))(TOKENS), merged(TOKENS))
        assert torch.equal(lora.load_model(str(ckpt))(TOKENS), merged(TOKENS))  # what the trainers load
    # a LoRA run on top of that adapter checkpoint: its base pointer is an adapter checkpoint, merged in turn
    config = TrainConfig(output_dir=str(tmp_path / "second"), lr=5e-3, micro_batch_size=4, max_steps=1,
                         warmup_ratio=0.0, precision="fp32", lora_rank=2, lora_targets="w1,w3")
    second = add_lora(lora.load_model(str(ckpt)), config, str(ckpt))
    Trainer(second, second, examples, lambda b: collate(b, "cpu"), response_loss, config, world1).fit()
    with torch.no_grad():
        lora.merge_lora(str(tmp_path / "second" / "checkpoint-1"), str(tmp_path / "merged3"))
        torch.testing.assert_close(load_model(str(tmp_path / "merged3"))(TOKENS), second.eval()(TOKENS), atol=1e-5,
                                   rtol=1e-5)
        assert (second(TOKENS) - adapted).abs().max() > 1e-4  # the second adapters did change the model


def test_lora_resume_in_bf16_is_bit_exact(world1, stories_dir, tmp_path):
    examples = sft_examples(512, 12)
    whole, trainer = sft_trainer(stories_dir, examples, str(tmp_path / "whole"), world1, "bf16", save_every=2,
                                 lora_dropout=0.1, activation_checkpointing=True)
    assert whole.tok_embeddings.weight.dtype == torch.bfloat16  # a frozen base is held in the compute dtype
    trainer.fit()
    # the checkpoint with its adapters unmerged on a bfloat16 base computes what the trained model computes (what an
    # evaluation in bf16 reads); merged into bfloat16 weights it computes something else
    saved = resolve_checkpoint(str(tmp_path / "whole"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = whole.eval()(TOKENS)
        assert torch.equal(lora.load_model(saved, dtype=torch.bfloat16, merge=False)(TOKENS), trained)
        assert not torch.equal(lora.load_model(saved, dtype=torch.bfloat16)(TOKENS), trained)
    _, crashing = sft_trainer(stories_dir, examples, str(tmp_path / "cut"), world1, "bf16", save_every=2,
                              lora_dropout=0.1, activation_checkpointing=True)
    step = crashing.train_step

    def crash_at_4():
        if crashing.step == 3:
            raise RuntimeError("killed")
        return step()

    crashing.train_step = crash_at_4
    with pytest.raises(RuntimeError, match="killed"):
        crashing.fit()
    resumed, trainer = sft_trainer(stories_dir, examples, str(tmp_path / "cut"), world1, "bf16", save_every=2,
                                   lora_dropout=0.1, activation_checkpointing=True)
    trainer.fit(resume=True)
    for key, value in lora.adapter_state(whole).items():
        assert torch.equal(value, lora.adapter_state(resumed)[key]), key
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]
              for name in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_ppo_with_lora_uses_the_base_as_reference_and_resumes(world1, stories_dir, tmp_path):
    from test_ppo import tiny_setup, token_reward
    from step3_rl.train_ppo import run_ppo
    reward = token_reward(426)  # 426: "." in tok512

    def run(name, resume=False, crash_at=None):
        calls = []

        def fn(rollouts):
            calls.append(1)
            if len(calls) == crash_at:
                raise RuntimeError("killed")
            return reward(rollouts)

        cfg = TrainConfig(output_dir=str(tmp_path / name), lr=1e-2, micro_batch_size=4, warmup_ratio=0.0, seed=3,
                          save_every=1, lora_rank=4, lora_alpha=16)
        return run_ppo(tiny_setup(tmp_path, stories_dir, ppo_steps=3), cfg, world1, resume=resume, reward_fn=fn)

    history = run("whole")
    assert history[0]["kl"] == 0.0  # fresh adapters: the policy is its base, which is the reference
    assert history[1]["kl"] != 0.0  # trained adapters moved the policy away from the base
    with pytest.raises(RuntimeError, match="killed"):
        run("cut", crash_at=3)  # dies while scoring step 3; the last checkpoint holds step 2
    run("cut", resume=True)
    whole, cut = tmp_path / "whole" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3"
    for sub in ("", "value"):
        assert not list((whole / sub).glob("consolidated.*.pth"))  # adapters (and the value head) only
        a, b = (torch.load(d / sub / "adapter.00.pth", weights_only=True) for d in (whole, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
