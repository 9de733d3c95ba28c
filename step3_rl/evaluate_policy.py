"""Trained policies against their starting point, on prompts no step trained on (SALMON step 3's figures).

  python -m step3_rl.evaluate_policy --initial_ckpt D --policy dpo=runs/dpo --policy ppo=runs/ppo \
      --reward_ckpt runs/rm --output_file runs/policy_eval.json [--num_prompts 64]

Prompts: the first user turns of OASST1's validation split (--messages_file; step 1 and PPO draw theirs from the train
split's data/oasst1/oasst1_prompts.json), or any prompts file (--prompts_file), in the policy's chat format; the
first --num_prompts whose query fits --max_prompt_len tokens. A --policy is NAME=DIR (a checkpoint, a LoRA adapter
checkpoint, or a training output directory: its latest checkpoint). For the initial policy and each trained one, with
the same per-prompt seeds:
  reward        the reward model's score of the response under --num_principles RL-time principles drawn by weight
                per prompt (principle_collection_ppo.json, as PPO draws them; the same draw for every policy);
                reward_gain, the mean per-prompt difference to the initial policy's reward, and reward_gain_se, its
                standard error (paired: the same prompts, seeds and principles);
  kl            KL(pi || pi_0) per sequence, estimated on the policy's own samples (k1, unbiased):
                mean over prompts of sum_t [log pi(y_t | ...) - log pi_0(y_t | ...)], both with logits / temperature,
                as PPO's own "kl" figure;
  length        mean response tokens, and the share that never stopped (hit --max_gen_len);
  win_rate      the initial policy as judge (step 1's judge, llama_mp/judge.py): the trained response as output 1
                against the initial one, under every principle of --judge_principle_file (or its first
                --judge_principles), both orders; the share of
                (prompt, principle) judgments with r12 + r21 > 0 (a tie counts one half), and both_orders_agree (the
                share where both orders prefer the same response).
Sampling and the reward model in --precision, the KL's log-probs in --kl_precision (default fp32). fp32: float32
weights, adapters merged. bf16 (auto: where the device computes it natively): every checkpoint's weights in bfloat16
under autocast (a float32 residual stream, as the trainers compute), a LoRA checkpoint's adapters attached unmerged
in float32 to its base, which is exactly a bf16 LoRA run's arithmetic (merged into bfloat16 weights, the part of an
update below half a bfloat16 step of a weight would be rounded away); a fully fine-tuned policy's weights are rounded
to bfloat16; the LM head of log-probs in float32. bf16 sampling and rewards are ~2x faster on a CPU with native bf16
(SmolLM2, 2 cores: responses 105 -> 49 s, rewards 80 -> 37 s). bf16 log-probs are not used for the KL by default:
their per-token rounding (sampling with a KV cache and scoring without one round differently) biases the estimate by
~0.1 nats per 90-token response (measured on SmolLM2: DPO 0.035 in fp32, -0.050 in bf16), larger than the KL of a
short run. With --kl_precision fp32 each policy is loaded a second time in float32 to score its own samples (and the
initial one, once, to score every policy's): the estimate is then E over bf16 samples of the float32 log-ratio, whose
bias from sampling in bf16 is of second order (the product of the bf16 perturbation and the log-ratio). The judge
runs in --judge_dtype. Each data-parallel replica takes a slice of the prompts. Writes JSON {"prompts",
"prompt_source", "policies": {name: figures}} and beside it
<output>.samples.jsonl (each prompt's responses and rewards); refuses to replace them without --overwrite.
"""

import argparse
import math
import os
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from llama_mp import cli, distributed, outputs
from llama_mp.chat import DATA, chat_format, load_principles
from llama_mp.checkpoint import check_policy, check_reward_model, resolve_checkpoint
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.jsonl import read_text, write_json_atomic, write_jsonl_atomic
from llama_mp.judge import DEFAULT_JUDGE_PRINCIPLES, DEFAULT_JUDGE_PROMPT, answer_token_ids, half_credit, judge_chunk
from llama_mp.lora import load_model
from llama_mp.progress import Progress
from llama_mp.prompts import load_prompts, prompt_id, prompt_keys, shares_prompt
from llama_mp.sampler import Sampler, derive_seed
from llama_mp.tokenizer import load_tokenizer
from llama_mp.train import compute_context, resolve_precision
from step2_reward_model.human_pairs import MESSAGES, first_turn_prompts
from step2_reward_model.reward_model import PromptBuilder, RewardModel, RewardScorer, load_head
from step3_rl.train_ppo import weighted_sample


@dataclass
class EvaluateOptions(cli.Layout):
    initial_ckpt: Optional[str] = field(default=None, metadata={"help": "the policy every trained one started from"})
    policy: list[str] = field(default_factory=list, metadata={
        "help": "NAME=DIR: a trained policy (repeat the flag for several)"})
    reward_ckpt: Optional[str] = field(default=None, metadata={
        "help": "a reward model checkpoint or its training output dir"})
    tokenizer_path: Optional[str] = field(default=None, metadata={"help": "default: the one initial_ckpt carries"})
    output_file: Optional[str] = None
    messages_file: str = MESSAGES
    prompts_file: Optional[str] = field(default=None, metadata={"help": "prompt records instead of messages_file"})
    exclude_prompts: list[str] = field(default_factory=list, metadata={
        "help": "files of records (prompts, training pairs) whose prompts, by id or instruction, are left out: what "
                "trained the policies and the reward model (two OASST1 validation first turns repeat prompts of "
                "data/oasst1/oasst1_prompts.json, step 1's and PPO's default prompts, word for word)"})
    num_prompts: PositiveInt = 64
    max_prompt_len: PositiveInt = field(default=192, metadata={"help": "longer queries are left out"})
    max_gen_len: PositiveInt = 128
    temperature: float = 0.7
    seed: int = 1234
    chat_format: Literal["auto", "dromedary", "template"] = "auto"
    principle_file: str = os.path.join(DATA, "salmon/principle_collection_ppo.json")
    num_principles: int = 3
    rm_prompt_template: str = os.path.join(DATA, "salmon/salmon_reward_model_prompt_v1.txt")
    rm_query_len: int = 128
    rm_response_len: int = 512
    judge_principle_file: str = DEFAULT_JUDGE_PRINCIPLES
    judge_principles: int = field(default=0, metadata={"help": "the first N principles of the file (0: all)"})
    judge_prompt_template: str = DEFAULT_JUDGE_PROMPT
    max_instruction_tokens: int = 256
    max_response_tokens: int = 640
    judge_max_seq_len: PositiveInt = 2048
    max_batch_size: PositiveInt = 32
    precision: Literal["auto", "fp32", "bf16"] = field(default="fp32", metadata={
        "help": "of sampling and the reward model; bf16: faster, LoRA adapters unmerged; auto: bf16 where the device "
                "computes it natively"})
    kl_precision: Literal["auto", "fp32", "bf16"] = field(default="fp32", metadata={
        "help": "of the KL's log-probs (bf16: biased by ~0.1 nats per response; fp32 with a bf16 --precision loads "
                "each policy a second time, in float32)"})
    judge_dtype: cli.Dtype = field(default="auto", metadata={"help": "auto: bfloat16 on CUDA, else float32"})


def parse_policy(text: str) -> tuple[str, str]:
    """A --policy NAME=CHECKPOINT_DIR as (name, directory)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--policy: expected NAME=CHECKPOINT_DIR, got {text!r}")
    return name, path


def heldout_prompts(opts) -> tuple[list[dict], str]:
    if opts.prompts_file:
        prompts, source = load_prompts(opts.prompts_file), opts.prompts_file
    else:
        prompts = [{"id": pid, "instruction": text, "input": ""} for pid, text in first_turn_prompts(opts.messages_file)]
        if not prompts:
            raise ValueError(f"{opts.messages_file}: no first-turn prompts")
        source = f"{opts.messages_file} (first user turns)"
    for path in opts.exclude_prompts:  # held out from what trained the models too (PPO's prompts, PMP's pairs)
        trained = prompt_keys(load_prompts(path))
        prompts = [p for p in prompts if not shares_prompt(p, trained)]
        if not prompts:
            raise ValueError(f"{path}: leaves out every prompt of {source}")
        source += f" without the prompts of {path}"
    return prompts, source


def gather(info, rows: list) -> list:
    """Every data-parallel replica's rows, in replica order (identical on all ranks)."""
    if info.data_parallel_size == 1:
        return rows
    from fairscale.nn.model_parallel import initialize as fs_init
    everything = [None] * info.data_parallel_size
    torch.distributed.all_gather_object(everything, rows, group=fs_init.get_data_parallel_group())
    return [r for part in everything for r in part]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step3_rl.evaluate_policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file and its samples")
    args, opts = parse_config(parser, EvaluateOptions)
    require(opts, "initial_ckpt", "policy", "reward_ckpt", "output_file")
    policies = [parse_policy(text) for text in opts.policy]
    names = [name for name, _ in policies]
    if len(set(names)) != len(names) or "initial" in names:
        raise ValueError(f"--policy names must be distinct and not 'initial', got {names}")
    for ckpt in [opts.initial_ckpt, *(path for _, path in policies)]:
        check_policy(resolve_checkpoint(ckpt))
    check_reward_model(resolve_checkpoint(opts.reward_ckpt))
    samples_file = os.path.splitext(opts.output_file)[0] + ".samples.jsonl"
    prompts, source = heldout_prompts(opts)
    rm_principles = load_principles(opts.principle_file)
    judge_principles = load_principles(opts.judge_principle_file)
    judge_principles = judge_principles[:opts.judge_principles] if opts.judge_principles > 0 else judge_principles
    judge_template, rm_template = read_text(opts.judge_prompt_template), read_text(opts.rm_prompt_template)

    info = distributed.init(opts.model_parallel_size, seed=opts.seed)
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.initial_ckpt)
    chat = chat_format(tokenizer, opts.chat_format)
    queries = [chat.query(p["instruction"], p["input"]) for p in prompts]
    fits = [i for i, q in enumerate(queries) if len(tokenizer.encode(q, bos=True, eos=False)) <= opts.max_prompt_len]
    chosen = fits[:opts.num_prompts]
    if not chosen:
        raise ValueError(f"{source}: no prompt fits --max_prompt_len {opts.max_prompt_len}")
    mine = chosen[info.data_parallel_rank::info.data_parallel_size]
    mp = (info.model_parallel_size, info.model_parallel_rank)
    precision = resolve_precision(opts.precision, info.device)
    kl_precision = resolve_precision(opts.kl_precision, info.device)
    judge_dtype = cli.resolve_dtype(opts.judge_dtype, info.device)
    seq_len = opts.max_prompt_len + opts.max_gen_len + 1

    def load(ckpt: str, max_seq_len: Optional[int], precision: str):
        """A policy or the reward model's backbone in `precision` (bf16: LoRA adapters unmerged, see above)."""
        return load_model(resolve_checkpoint(ckpt), *mp, max_seq_len, device=info.device,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float32, merge=precision == "fp32")

    def sampler_of(ckpt: str, precision: str) -> Sampler:
        return Sampler(load(ckpt, seq_len, precision), tokenizer, max_batch_size=opts.max_batch_size)

    initial = sampler_of(opts.initial_ckpt, precision)
    initial_kl = initial if kl_precision == precision else sampler_of(opts.initial_ckpt, kl_precision)
    if info.is_main:  # once the inputs have loaded (a refused output is refused before any sampling)
        outputs.claim([opts.output_file, samples_file], outputs.command_settings(opts), args.overwrite)
    seeds = [derive_seed(opts.seed, prompt_id(prompts[i]["instruction"], prompts[i]["input"])) for i in mine]
    draws = [weighted_sample(random.Random(seed), rm_principles, opts.num_principles) for seed in seeds]

    def respond(sampler: Sampler) -> list:
        with compute_context(precision, info.device):
            return sampler.generate([queries[i] for i in mine], opts.max_gen_len, opts.temperature, stop=chat.stop,
                                    seed=seeds, desc="respond")

    def sequence_logprobs(sampler: Sampler, completions) -> list[float]:
        rows = [j for j, c in enumerate(completions) if c.tokens]
        with compute_context(kl_precision, info.device):
            scores = sampler.score([queries[mine[j]] for j in rows], [completions[j].tokens for j in rows],
                                   opts.temperature) if rows else []
        out = [0.0] * len(completions)
        for j, s in zip(rows, scores):
            out[j] = sum(s)
        return out

    responses = {"initial": respond(initial)}
    kl = {"initial": [0.0] * len(mine)}
    for name, ckpt in policies:
        policy = sampler_of(ckpt, precision)
        responses[name] = respond(policy)
        if kl_precision != precision:
            del policy
            policy = sampler_of(ckpt, kl_precision)
        own = sequence_logprobs(policy, responses[name])
        del policy
        kl[name] = [a - b for a, b in zip(own, sequence_logprobs(initial_kl, responses[name]))]
    del initial, initial_kl

    rm = RewardModel(load(opts.reward_ckpt, None, precision))
    load_head(rm, os.path.join(resolve_checkpoint(opts.reward_ckpt), "head.pth"))
    scorer = RewardScorer(rm, PromptBuilder(tokenizer, rm_template, opts.rm_query_len, opts.rm_response_len))
    progress = Progress(len(responses) * len(mine), "reward", "responses")
    rewards = {}
    for name, completions in responses.items():
        with compute_context(precision, info.device):
            rewards[name] = scorer.score([prompts[i]["instruction"] for i in mine], [c.text for c in completions],
                                         draws).tolist()
        progress.update(len(mine))
    del rm, scorer

    judge = Sampler(load_model(resolve_checkpoint(opts.initial_ckpt), *mp, opts.judge_max_seq_len, device=info.device,
                               dtype=judge_dtype), tokenizer, max_batch_size=opts.max_batch_size)
    id_a, id_b = answer_token_ids(tokenizer)
    judged = {}
    progress = Progress(len(policies) * len(mine), "judge", "pairs")
    for name, _ in policies:
        pairs = [{"id": prompts[i]["id"], "example_idx": j, "instruction": prompts[i]["instruction"],
                  "input": prompts[i]["input"], "output_1": responses[name][j].text,
                  "output_2": responses["initial"][j].text} for j, i in enumerate(mine)]
        judged[name] = []
        for k in range(0, len(pairs), 4):
            judged[name] += judge_chunk(judge, chat, pairs[k:k + 4], judge_principles, judge_template, id_a, id_b,
                                        opts.max_instruction_tokens, opts.max_response_tokens)
            progress.update(len(pairs[k:k + 4]))

    rows = [{"id": prompts[i]["id"], "instruction": prompts[i]["instruction"], "principles": draws[j],
             **{name: {"response": responses[name][j].text, "token_ids": responses[name][j].tokens,
                       "finish_reason": responses[name][j].finish_reason, "reward": rewards[name][j],
                       "kl": kl[name][j]} for name in responses}} for j, i in enumerate(mine)]
    rows = gather(info, rows)
    judged = {name: gather(info, records) for name, records in judged.items()}
    if not info.is_main:
        return
    report = {"prompts": len(rows), "prompt_source": source, "temperature": opts.temperature,
              "policies": {name: figures(rows, name, judged.get(name)) for name in responses}}
    write_jsonl_atomic(samples_file, rows)
    write_json_atomic(opts.output_file, report)
    outputs.complete([opts.output_file, samples_file])
    print(table(report))
    print(f"{len(rows)} held-out prompts -> {opts.output_file}")


def mean(xs: list[float]):
    return round(sum(xs) / len(xs), 4) if xs else None


def standard_error(xs: list[float]):
    """Of the mean of xs: the sample standard deviation over sqrt(n) (None below 2 values)."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return round(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)), 4)


def figures(rows: list[dict], name: str, judgments: list[dict] = None) -> dict:
    # the gain is paired (the same prompts and seeds for every policy): its standard error is that of the per-prompt
    # differences, the figure that says whether a gain is more than the noise of this many prompts
    gains = [r[name]["reward"] - r["initial"]["reward"] for r in rows]
    out = {"reward_mean": mean([r[name]["reward"] for r in rows]), "reward_gain": mean(gains),
           "reward_gain_se": standard_error(gains),
           "kl": mean([r[name]["kl"] for r in rows]), "length": mean([len(r[name]["token_ids"]) for r in rows]),
           "unfinished": mean([float(r[name]["finish_reason"] == "length") for r in rows])}
    if judgments is not None:
        judged = [r for r in judgments if r.get("relative_score") is not None]
        out.update({"win_rate": mean([half_credit(sum(r["relative_score"])) for r in judged]),
                    "both_orders_agree": mean([float(r["prompt_preference"] in (1, 2)) for r in judged]),
                    "judgments": len(judged), "judgments_skipped": len(judgments) - len(judged)})
    return out


def table(report: dict) -> str:
    keys = ("reward_mean", "reward_gain", "reward_gain_se", "kl", "length", "unfinished", "win_rate",
            "both_orders_agree")
    lines = ["| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, f in report["policies"].items():
        lines.append(f"| {name} | " + " | ".join("" if f.get(k) is None else str(f[k]) for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
