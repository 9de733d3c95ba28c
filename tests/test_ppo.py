"""PPO: formulas against hand computations, a run that learns a programmatic reward, model parallel, resume."""

import json
import os
import pathlib

import pytest
import torch

from conftest import TOK512, run_distributed
from llama_mp import distributed
from llama_mp.checkpoint import load_shard, shard_paths
from llama_mp.train import TrainConfig
from step3_rl.ppo import KLController, gae, policy_loss, shaped_rewards, value_loss, whiten
from step3_rl.train_ppo import PPOOptions, run_ppo


def test_gae_equals_a_hand_written_loop():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(3):
        n = int(mask[row].sum())
        r, v = rewards[row, :n].tolist(), values[row, :n].tolist() + [0.0]  # V = 0 after the last token
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            expected[t] = running
        torch.testing.assert_close(advantages[row, :n], torch.tensor(expected), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(returns[row, :n], torch.tensor(expected) + values[row, :n], atol=1e-6, rtol=1e-6)
        assert advantages[row, n:].abs().sum() == 0


def test_policy_and_value_losses_equal_their_formulas():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.5, -1.0, -0.5]])  # ratios e^0.5 = 1.6487, e^-1 = 0.3679, 1
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-2 * 1.6487, -2 * 1.2) = -2.4 (clipped); token 2: max(0.3679, 0.8) = 0.8 (clipped)
    assert float(loss) == pytest.approx((-2.4 + 0.8) / 2, rel=1e-5)
    assert m["clipfrac"] == pytest.approx(1.0) and m["approx_kl"] == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[2.0, -1.0]])
    vloss, vm = value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)
    # token 1: V clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69; token 2: V -> -0.1: max(1, 0.81) = 1
    assert float(vloss) == pytest.approx(0.5 * (1.69 + 1.0) / 2, rel=1e-6)
    assert vm["value_clipfrac"] == pytest.approx(0.5)


def test_shaped_rewards_whitening_and_adaptive_kl():
    logp, ref = torch.tensor([[-1.0, -1.0, -2.0]]), torch.tensor([[-1.5, -0.5, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.05 + 3.0, 0.0]]))  # score at the last real token
    clamped, _ = shaped_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1, kl_clamp_min=True)
    torch.testing.assert_close(clamped, torch.tensor([[-0.05, 3.0, 0.0]]))
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    ctl = KLController(0.2, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_steps=100)  # error clipped to +0.2: beta * (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.2 * 1.002)


def tiny_setup(tmp_path, stories_dir, write=True, **overrides):
    prompts, meta = tmp_path / "prompts.jsonl", tmp_path / "meta.txt"
    if write:  # (spawned ranks read the files their parent wrote: two writers would race)
        prompts.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in
                                   ["Once upon a time", "Tom had a ball.", "The dog ran.", "Lily saw a bird."]))
        meta.write_text("Story:")
    opts = PPOOptions(policy_ckpt=stories_dir, reward_ckpt=stories_dir, tokenizer_path=TOK512,
                      prompt_file=str(prompts), meta_prompt_file=str(meta), rollout_batch_size=8, ppo_minibatch_size=8,
                      ppo_epochs=1, max_gen_len=12, max_prompt_len=64, max_seq_len=128, kl_coef=0.05)
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


def token_reward(token_id: int):
    """Programmatic reward: how many response tokens are `token_id`."""
    return lambda rollouts: torch.tensor([float(sum(t == token_id for t in r["tokens"])) for r in rollouts])


def test_ppo_learns_a_programmatic_reward_with_bounded_kl(world1, stories_dir, tokenizer, tmp_path):
    target = tokenizer.encode(".", bos=False, eos=False)[-1]  # reward: more full stops in 12 tokens
    opts = tiny_setup(tmp_path, stories_dir, ppo_steps=25, rollout_batch_size=16, ppo_minibatch_size=8, ppo_epochs=2)
    cfg = TrainConfig(output_dir=str(tmp_path / "ppo"), lr=3e-4, micro_batch_size=8, warmup_ratio=0.0, seed=1)
    history = run_ppo(opts, cfg, world1, reward_fn=token_reward(target))
    first = sum(h["reward/mean"] for h in history[:5]) / 5
    last = sum(h["reward/mean"] for h in history[-5:]) / 5
    # measured over seeds 1-3 (this run is seed 1; the trajectory follows every kernel's rounding): 1.4-1.6 -> 2.7-3.8
    # full stops per response, a gain of 1.1-2.1; no learning would be 0 +- 0.2 (reward std ~1 over 2 x 80 responses)
    assert last > first + 0.5, (first, last)
    # step 1: the policy is its reference, and its log-probs run the reference's kernels (the sampler's fused
    # projections stay in the sampler), so the KL is exactly 0
    assert history[0]["kl"] == 0.0
    # nats per 12-token response, bounded by the KL penalty: the last 5 steps' mean was 12-23 over seeds 1-3 with
    # kl_coef 0.05 and 64-95 with kl_coef 0 (the max over steps, 15-33 against 81-101, is noisier); session 18, bf16,
    # seeds 1-10: 11-33 with torch's fused attention kernel, 12-36 with the blocked one (seed 1: 33 and 36). An
    # attention that rounded its scores to bf16 (2x the fused kernel's gradient error) ran away in 2 of 10 (50, 118)
    assert sum(h["kl"] for h in history[-5:]) / 5 < 40.0
    assert (tmp_path / "ppo" / "rollouts" / "step_25.jsonl").exists()
    record = json.loads(open(tmp_path / "ppo" / "metrics.jsonl").readline())
    for key in ("reward/mean", "reward/std", "kl", "entropy", "approx_kl", "clipfrac", "value_loss", "response_length",
                "unfinished", "time/generate", "time/score", "time/update"):
        assert key in record


def ppo_one_step(tmp_dir: str, stories_dir: str, model_parallel_size: int):
    info = distributed.init(model_parallel_size)
    opts = tiny_setup(pathlib.Path(tmp_dir), stories_dir, write=False, ppo_steps=1)
    # float32: the layouts are equal exactly; bf16 rounds each layout's partial sums (and so its samples) differently
    cfg = TrainConfig(output_dir=os.path.join(tmp_dir, f"mp{model_parallel_size}"), lr=1e-3, micro_batch_size=4,
                      warmup_ratio=0.0, seed=3, precision="fp32")
    history = run_ppo(opts, cfg, info, reward_fn=token_reward(426))  # 426: "." in tok512
    return {"history": json.dumps(history[0], sort_keys=True)}


def test_model_parallel_2_equals_1_for_one_ppo_update(tmp_path, stories_dir):
    tiny_setup(tmp_path, stories_dir)  # writes the prompt files once
    single = ppo_one_step(str(tmp_path), stories_dir, 1)
    distributed.teardown()
    run_distributed(ppo_one_step, 2, str(tmp_path), stories_dir, 2, tmp_dir=str(tmp_path))
    one = json.loads(single["history"])
    two = json.loads(json.loads(json.dumps(torch.load(tmp_path / "rank0.pt", weights_only=True)))["history"])
    for key in ("reward/mean", "kl", "policy_loss", "value_loss", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key
    a = [load_shard(p) for p in shard_paths(str(tmp_path / "mp1" / "checkpoint-1"))]
    b = [load_shard(p) for p in shard_paths(str(tmp_path / "mp2" / "checkpoint-1"))]
    key = "layers.0.attention.wq.weight"
    torch.testing.assert_close(torch.cat([s[key] for s in b]), a[0][key], atol=1e-5, rtol=1e-4)


def test_resume_equals_an_uninterrupted_ppo_run(world1, stories_dir, tmp_path):
    reward = token_reward(426)  # 426: "." in tok512

    def run(name, resume=False, crash_at=None):
        opts = tiny_setup(tmp_path, stories_dir, ppo_steps=4, ppo_epochs=2, ppo_minibatch_size=4)
        cfg = TrainConfig(output_dir=str(tmp_path / name), lr=1e-3, micro_batch_size=4, save_every=2,
                          warmup_ratio=0.25, seed=5)
        calls = []

        def fn(rollouts):
            calls.append(1)
            if crash_at is not None and len(calls) == crash_at:
                raise RuntimeError("killed")
            return reward(rollouts)

        return run_ppo(opts, cfg, world1, resume=resume, reward_fn=fn)

    run("whole")
    with pytest.raises(RuntimeError, match="killed"):
        run("cut", crash_at=4)  # dies while scoring step 4; the last checkpoint holds step 2
    run("cut", resume=True)
    for sub in ("", "value"):
        a = load_shard(str(tmp_path / "whole" / "checkpoint-16" / sub / "consolidated.00.pth"))
        b = load_shard(str(tmp_path / "cut" / "checkpoint-16" / sub / "consolidated.00.pth"))
        for key in a:
            assert torch.equal(a[key], b[key]), (sub, key)
    whole = torch.load(tmp_path / "whole" / "checkpoint-16" / "value" / "head.pth", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint-16" / "value" / "head.pth", weights_only=True)
    assert torch.equal(whole["head.weight"], cut["head.weight"])
    metrics = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("whole", "cut")}
    assert [r["step"] for r in metrics["cut"]] == [1, 2, 3, 4]  # step 3, logged before the crash, is not repeated
    assert [r["reward/mean"] for r in metrics["cut"]] == [r["reward/mean"] for r in metrics["whole"]]


def whiten_half(rank_values):
    info = distributed.init(1)  # two data-parallel replicas
    from fairscale.nn.model_parallel import initialize as fs_init
    x = torch.tensor(rank_values[info.data_parallel_rank])
    return {"w": whiten(x, torch.ones_like(x), group=fs_init.get_data_parallel_group())}


def test_advantages_are_whitened_over_all_replicas(tmp_path):
    halves = [[[1.0, 2.0, 3.0]], [[10.0, 20.0, 30.0]]]
    ranks = run_distributed(whiten_half, 2, halves, tmp_dir=str(tmp_path))
    together = whiten(torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]]), torch.ones(1, 6))
    torch.testing.assert_close(torch.cat([ranks[0]["w"], ranks[1]["w"]], dim=1), together, atol=1e-5, rtol=1e-5)
