"""PPO against the principle-following reward model (SALMON step 3), through the project's shared training loop.

  python -m step3_rl.train_ppo --config configs/ppo_tiny.yaml --policy_ckpt D --reward_ckpt runs/rm \
      --tokenizer_path T --output_dir runs/ppo [--resume]

Roles: the policy (trained), a frozen copy of it (the KL reference), the value model (the reward model's backbone with
a zero-initialised head, trained) and the reward model (frozen). With LoRA (--lora_rank) the policy and the value model
train adapters on frozen bases, and the reference is the policy with its adapters off (no second copy). Generation,
scoring and the rollouts' log-probs run in the training's precision, like the loss. Each PPO step:
  1. rollout: --rollout_batch_size prompts per data-parallel replica in the policy's chat format (--chat_format auto:
     its template, e.g. ChatML, when its tokenizer has one, else Dromedary's), sampled by the llama_mp sampler
     (temperature 0.7), cut at an end-of-turn id or Dromedary's "\\n\\n### User"; one seed per (step, rollout), so a
     resumed run repeats it;
  2. scoring: salmon_reward_model_prompt_v1.txt with 3 principles drawn by weight without replacement from
     principle_collection_ppo.json per rollout; the reward is read at the last real token; a response that never
     stopped gets --unfinished_penalty; optional length bonus (--length_bonus_scale, x the prompt's "length_bonus");
  3. advantages: per-token k1 KL to the reference (optionally clamped at 0, as the reference does) times the fixed or
     adaptive coefficient, the score at each row's last token, optional reward whitening or scaling; GAE; advantages
     whitened with the statistics of all data-parallel replicas' rollouts;
  4. update: --ppo_epochs passes over shuffled minibatches; clipped policy loss + vf_coef x clipped value loss;
     log-probs recomputed with logits / temperature (response positions only reach the LM head).
Logged per step (metrics.jsonl + progress line): reward mean/std, KL, entropy, approx-KL, clip fractions, value loss,
response length, share unfinished, seconds in generation / scoring / update; rollouts saved as rollouts/step_N.jsonl.
"""

import argparse
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama_mp import cli, distributed, lora
from llama_mp.chat import DATA, DEFAULT_META_PROMPT, chat_format, load_principles
from llama_mp.batching import right_pad
from llama_mp.checkpoint import (check_policy, check_reward_model, load_weights, resolve_checkpoint, save_params,
                                 save_shard)
from llama_mp.jsonl import read_json, write_json_atomic, write_jsonl_atomic
from llama_mp.logprobs import chosen_logprobs
from llama_mp.lora import load_model
from llama_mp.prompts import load_prompts
from llama_mp.sampler import Sampler, derive_seed
from llama_mp.tokenizer import load_tokenizer
from llama_mp.config import require
from llama_mp.train import TrainConfig, Trainer, add_lora, backbone_dtype, parse_task_args
from step2_reward_model.reward_model import (PromptBuilder, RewardModel, RewardScorer, load_head, load_reward_model,
                                             save_head)
from step3_rl.ppo import KLController, gae, masked_mean, policy_loss, shaped_rewards, value_loss, whiten


@dataclass
class PPOOptions:
    policy_ckpt: str = ""
    reward_ckpt: str = ""  # a reward-model checkpoint, or its training directory (its latest checkpoint)
    value_ckpt: str = ""  # default: the reward model's backbone
    tokenizer_path: str = ""
    prompt_file: str = os.path.join(DATA, "oasst1/oasst1_prompts.json")
    max_prompts: int = 0
    meta_prompt_file: str = DEFAULT_META_PROMPT
    chat_format: Literal["auto", "dromedary", "template"] = "auto"  # how the policy is prompted (llama_mp/chat.py)
    rm_prompt_template: str = os.path.join(DATA, "salmon/salmon_reward_model_prompt_v1.txt")
    principle_file: str = os.path.join(DATA, "salmon/principle_collection_ppo.json")
    num_principles: int = 3
    ppo_steps: int = 10
    rollout_batch_size: int = 8  # prompts per data-parallel replica per PPO step
    ppo_minibatch_size: int = 4
    ppo_epochs: int = 2
    temperature: float = 0.7
    max_prompt_len: int = 256
    max_gen_len: int = 128
    max_seq_len: int = 512
    rm_query_len: int = 128
    rm_response_len: int = 512
    rm_max_seq_len: int = 1536
    kl_coef: float = 0.01
    kl_target: float = 0.0  # > 0: adaptive KL coefficient (Ziegler) toward this KL per sequence
    kl_horizon: float = 10000.0
    kl_clamp_min: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    unfinished_penalty: float = -6.0
    length_bonus_scale: float = 0.0
    length_bonus_cap: float = 0.8
    reward_scale: float = 1.0
    whiten_rewards: bool = False



class PolicyAndValue(nn.Module):
    """The trained parameters: `model` is the policy (the Trainer's backbone), `value` the value model."""

    def __init__(self, policy, value: RewardModel):
        super().__init__()
        self.model, self.value = policy, value


def weighted_sample(rng: random.Random, principles: list[dict], k: int) -> list[str]:
    """k definitions drawn by weight without replacement."""
    pool, chosen = list(principles), []
    for _ in range(min(k, len(pool))):
        pick = rng.choices(range(len(pool)), weights=[p.get("weight", 1) for p in pool])[0]
        chosen.append(pool.pop(pick)["definition"])
    return chosen


def forward_logp_values(module: PolicyAndValue, batch: dict, temperature: float, with_value: bool = True,
                        with_entropy: bool = False):
    """Per response token [B, L] (0 past a row's response): log-prob under logits / T, the entropy of that distribution
    (if asked; a statistic without gradient), and the value read from the hidden state before the token. Only the
    positions that predict response tokens reach the LM head; the value model reads hidden states only."""
    tokens, start, mask = batch["tokens"], batch["start"], batch["mask"]
    index = (start[:, None] - 1 + torch.arange(mask.shape[1], device=tokens.device)[None, :]).clamp(
        max=tokens.shape[1] - 1)  # the position that predicts response token j of each row
    rows, cols = (mask > 0).nonzero(as_tuple=True)
    positions = index[rows, cols]
    hidden = module.model(tokens, return_hidden=True)
    out = chosen_logprobs(module.model, hidden[rows, positions], tokens[rows, positions + 1], temperature,
                          with_entropy=with_entropy)
    logp_flat, entropy_flat = out if with_entropy else (out, None)
    logp = torch.zeros(mask.shape, device=tokens.device).index_put((rows, cols), logp_flat)
    entropy = None if entropy_flat is None else torch.zeros(mask.shape, device=tokens.device).index_put(
        (rows, cols), entropy_flat)
    values = None
    if with_value:
        hidden = module.value.model(tokens, return_hidden=True)
        values = module.value.scalar(hidden[torch.arange(tokens.shape[0], device=tokens.device)[:, None], index])
    return logp, entropy, values


def run_ppo(opts: PPOOptions, cfg: TrainConfig, info, resume: bool = False,
            reward_fn: Optional[Callable[[list[dict]], torch.Tensor]] = None, dtype=torch.float32) -> list[dict]:
    """The PPO loop; `reward_fn(rollouts)` replaces the reward model (tests use a programmatic reward). `dtype`: the
    frozen reward model's weights (the trained ones are float32, computed in cfg.precision)."""
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.policy_ckpt)
    prompts = load_prompts(opts.prompt_file)  # step 1's loader: the same records, ids and checks
    if opts.max_prompts:
        prompts = prompts[:opts.max_prompts]
    chat = chat_format(tokenizer, opts.chat_format, opts.meta_prompt_file)
    queries = [tokenizer.encode(chat.query(p["instruction"], p["input"]), bos=True, eos=False) for p in prompts]
    keep = [i for i, q in enumerate(queries) if len(q) <= opts.max_prompt_len]  # longer prompts are filtered out
    if not keep:
        raise ValueError(f"{opts.prompt_file}: no prompt fits max_prompt_len {opts.max_prompt_len}")
    mp_size, mp_rank, device = info.model_parallel_size, info.model_parallel_rank, info.device
    trained_dtype = backbone_dtype(cfg, device)  # float32, or a frozen LoRA base in the compute dtype
    policy = load_model(opts.policy_ckpt, mp_size, mp_rank, opts.max_seq_len, device=device, dtype=trained_dtype)
    add_lora(policy, cfg, opts.policy_ckpt)
    reference = None  # with LoRA: the policy with its adapters off
    if not lora.has_adapters(policy):
        reference = load_model(opts.policy_ckpt, mp_size, mp_rank, opts.max_seq_len, device=device,
                               dtype=trained_dtype).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    value_dir = opts.value_ckpt or opts.reward_ckpt or opts.policy_ckpt
    value = RewardModel(load_model(value_dir, mp_size, mp_rank, opts.max_seq_len, device=device, dtype=trained_dtype))
    add_lora(value.model, cfg, value_dir)
    with torch.no_grad():
        value.head.weight.zero_()  # the value head starts at zero
        value.head.bias.zero_()
    module = PolicyAndValue(policy, value)
    if reward_fn is None:
        rm = load_reward_model(opts.reward_ckpt, mp_size, mp_rank, opts.rm_max_seq_len, device=device,
                               dtype=dtype).eval()
        with open(opts.rm_prompt_template, encoding="utf-8") as f:
            builder = PromptBuilder(tokenizer, f.read(), opts.rm_query_len, opts.rm_response_len)
        principles = load_principles(opts.principle_file)
        scorer = RewardScorer(rm, builder, batch_size=cfg.micro_batch_size)

        def reward_fn(rollouts: list[dict]) -> torch.Tensor:
            return scorer.score([r["instruction"] for r in rollouts], [r["response"] for r in rollouts],
                                [r["principles"] for r in rollouts])
    else:
        principles = [{"definition": "", "weight": 1}]
    sampler = Sampler(policy, tokenizer, max_batch_size=opts.rollout_batch_size, progress_every=1e9)
    kl_ctl = KLController(opts.kl_coef, opts.kl_target, opts.kl_horizon)
    minibatches = -(-opts.rollout_batch_size // opts.ppo_minibatch_size)

    def save_extra(directory: str) -> None:
        """The value model (adapters or weights, and its head) and the KL controller, beside the policy."""
        if info.data_parallel_rank == 0:
            if lora.has_adapters(value.model):
                lora.save_adapters(os.path.join(directory, "value"), mp_rank, value.model)
            else:
                save_shard(os.path.join(directory, "value"), mp_rank, value.model.state_dict(), value.model.args)
            if mp_rank == 0:
                if not lora.has_adapters(value.model):
                    save_params(os.path.join(directory, "value"), value.model.args)
                save_head(value, os.path.join(directory, "value", "head.pth"))
                write_json_atomic(os.path.join(directory, "ppo_state.json"), {"kl": kl_ctl.state_dict()})

    def load_extra(directory: str) -> None:
        if lora.has_adapters(value.model):
            lora.load_adapters(value.model, os.path.join(directory, "value"), mp_size, mp_rank)
        else:
            load_weights(value.model, os.path.join(directory, "value"), mp_size, mp_rank)
        load_head(value, os.path.join(directory, "value", "head.pth"))  # the reward model's key checks
        kl_ctl.load_state_dict(read_json(os.path.join(directory, "ppo_state.json"))["kl"])

    def loss(mod, batch):
        logp, _, values = forward_logp_values(mod, batch, opts.temperature)
        pg, pg_metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], opts.clip)
        vf, vf_metrics = value_loss(values, batch["old_values"], batch["returns"], batch["mask"], opts.value_clip)
        return pg + opts.vf_coef * vf, {**pg_metrics, **vf_metrics}

    trainer = Trainer(module, policy, None, None, loss, cfg, info, task="ppo", save_extra=save_extra,
                      load_extra=load_extra, head_prefixes=(), tokenizer=tokenizer)
    trainer.set_total_steps(opts.ppo_steps * opts.ppo_epochs * minibatches)
    os.makedirs(os.path.join(cfg.output_dir, "rollouts"), exist_ok=True)
    per_step = opts.rollout_batch_size * info.data_parallel_size

    def ppo_step() -> dict:
        """One PPO iteration of the shared loop (trainer.iteration is the step number)."""
        step = trainer.iteration
        # 1. rollouts: a deterministic slice of a per-epoch permutation of the prompts
        order = np.random.default_rng(cfg.seed + (step * per_step) // len(keep)).permutation(keep)
        first = (step * per_step) % len(keep) + info.data_parallel_rank * opts.rollout_batch_size
        chosen = [int(order[(first + j) % len(keep)]) for j in range(opts.rollout_batch_size)]
        t0 = time.perf_counter()
        module.eval()  # rollouts and their log-probs without dropout (the update's train mode is the Trainer's)
        with trainer.autocast():
            completions = sampler.generate([queries[i] for i in chosen], opts.max_gen_len, opts.temperature,
                                           stop=chat.stop, seed=[derive_seed(cfg.seed, step, first + j)
                                                               for j in range(len(chosen))])
        t1 = time.perf_counter()
        rng = random.Random(derive_seed(cfg.seed, step, -1 - info.data_parallel_rank))
        rollouts = [{"prompt_index": i, "instruction": prompts[i]["instruction"], "response": c.text,
                     "finish_reason": c.finish_reason, "tokens": c.tokens,
                     "principles": weighted_sample(rng, principles, opts.num_principles)}
                    for i, c in zip(chosen, completions)]
        # 2. scores
        with trainer.autocast():
            score = reward_fn(rollouts).to(device).float()
        finished = torch.tensor([r["finish_reason"] in ("eos", "stop") for r in rollouts], device=device)
        raw_score = score.clone()
        score = score + (~finished).float() * opts.unfinished_penalty
        if opts.length_bonus_scale:
            frac = torch.tensor([len(r["tokens"]) / opts.max_gen_len * float(prompts[r["prompt_index"]].get(
                "length_bonus", 1.0)) for r in rollouts], device=device)
            score = score + opts.length_bonus_scale * frac.clamp(max=opts.length_bonus_cap)
        t2 = time.perf_counter()
        # 3. old log-probs, reference log-probs, values; shaped rewards; GAE
        batch = rollout_batch(queries, chosen, [r["tokens"] for r in rollouts], device)
        with torch.no_grad(), trainer.autocast():  # the loss recomputes these in the same precision: ratio 1 at first
            old_logp, entropy, old_values = forward_logp_values(module, batch, opts.temperature, with_entropy=True)
            with lora.adapters_off(policy):  # (nothing to switch off without LoRA)
                ref_logp, _, _ = forward_logp_values(PolicyAndValue(reference or policy, value), batch,
                                                     opts.temperature, with_value=False)
        mask = batch["mask"]
        rewards, kl = shaped_rewards(score * opts.reward_scale, old_logp, ref_logp, mask, kl_ctl.value,
                                     opts.kl_clamp_min)
        dp_group = fs_init.get_data_parallel_group() if info.data_parallel_size > 1 else None
        if opts.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, group=dp_group)
        advantages, returns = gae(rewards, old_values, mask, opts.gamma, opts.lam)
        advantages = whiten(advantages, mask, group=dp_group)  # statistics of the whole rollout, all replicas
        batch.update(old_logp=old_logp, old_values=old_values, advantages=advantages, returns=returns)
        # 4. update: epochs over shuffled minibatches, each one optimizer step of the shared loop; a micro-batch is a
        # list of rows of this rollout batch
        stats = []
        shuffle = np.random.default_rng(derive_seed(cfg.seed, step, -1000))
        for _ in range(opts.ppo_epochs):
            perm = shuffle.permutation(len(rollouts))
            for m in range(minibatches):
                rows = perm[m * opts.ppo_minibatch_size:(m + 1) * opts.ppo_minibatch_size]
                stats.append(trainer.update([list(rows[k:k + cfg.micro_batch_size])
                                             for k in range(0, len(rows), cfg.micro_batch_size)],
                                            collate=lambda picked: select(batch, picked)))
        t3 = time.perf_counter()
        seq_kl = float((kl * mask).sum(1).mean())
        kl_ctl.update(seq_kl, per_step)
        if info.is_main:
            write_jsonl_atomic(os.path.join(cfg.output_dir, "rollouts", f"step_{step + 1}.jsonl"),
                               [{k: v for k, v in r.items() if k != "tokens"} | {"score": float(s)}
                                for r, s in zip(rollouts, raw_score)])
        return {"reward/mean": float(raw_score.mean()), "reward/std": float(raw_score.std()),
                "score/mean": float(score.mean()), "kl": seq_kl, "kl_coef": kl_ctl.value,
                "entropy": float(masked_mean(entropy, mask)),
                "response_length": float(mask.sum(1).mean()), "unfinished": float((~finished).float().mean()),
                **{k: float(np.mean([s[k] for s in stats])) for k in ("approx_kl", "clipfrac", "value_loss",
                                                                       "value_clipfrac", "policy_loss", "grad_norm")},
                "lr": stats[-1]["lr"], "tokens": sum(s["tokens"] for s in stats),
                "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}

    trainer.run({"ppo": asdict(opts)}, f"{len(keep)} prompts, {per_step} rollouts a step", resume=resume,
                iteration=ppo_step, iterations=opts.ppo_steps)
    return trainer.records


def rollout_batch(queries: list[list[int]], chosen: list[int], responses: list[list[int]], device) -> dict:
    """prompt + response token rows, right-padded; `start` = where each response begins; `mask` over responses."""
    seqs = [queries[i] + list(r) for i, r in zip(chosen, responses)]
    tokens = right_pad(seqs, device)
    length = max(1, max(len(r) for r in responses))
    mask = torch.zeros(len(seqs), length, device=device)
    for row, r in enumerate(responses):
        mask[row, :len(r)] = 1.0
    start = torch.tensor([len(queries[i]) for i in chosen], device=device)
    return {"tokens": tokens, "start": start, "mask": mask, "num_tokens": int(sum(len(s) for s in seqs))}


def select(batch: dict, rows) -> dict:
    """The rows of a rollout batch as a micro-batch (tensors indexed, counts recomputed)."""
    rows = torch.as_tensor(rows, device=batch["tokens"].device)
    out = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out["num_tokens"] = int(out["start"].sum() + out["mask"].sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step3_rl.train_ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args, layout, cfg, opts = parse_task_args(parser, PPOOptions)
    require(opts, "policy_ckpt", "reward_ckpt")  # tokenizer_path: default the policy's own tokenizer
    check_policy(opts.policy_ckpt)
    opts.reward_ckpt = resolve_checkpoint(opts.reward_ckpt)  # a training directory: its latest checkpoint
    check_reward_model(opts.reward_ckpt)
    info = distributed.init(layout.model_parallel_size, seed=cfg.seed)
    history = run_ppo(opts, cfg, info, resume=args.resume, dtype=cli.resolve_dtype(layout.dtype, info.device))
    if info.is_main and history:
        first, last = history[0], history[-1]
        print(f"[ppo] done: reward {first['reward/mean']:.3f} -> {last['reward/mean']:.3f}, "
              f"KL {first['kl']:.3f} -> {last['kl']:.3f}", flush=True)


if __name__ == "__main__":
    cli.run(main)
