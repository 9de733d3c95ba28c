"""PPO phase timings and DPO training throughput vs Hugging Face TRL, in one run.

  python scripts/bench_rl.py [--threads 2] [--dpo_steps 6] [--ppo_steps 3]
  .venv-bench/bin/python scripts/bench_rl.py --model smollm2 [--dpo_steps 3] [--ppo_steps 2] [--quick]

--model stories260K (the default) prints one JSON object:
  ppo_phase_seconds: mean seconds per PPO step in generation / scoring / update (8 rollouts of 64 tokens, a reward
      model made from the same backbone with a fresh head; the first step is a warm-up and not counted);
  dpo_tokens_per_s: the shared training loop's DPO step at 8 pairs of 64 prompt + 192 response tokens, counting chosen
      and rejected sequences (reference log-probs precomputed, as train_dpo does);
  trl_dpo_tokens_per_s: TRL's DPOTrainer on the same weights and the same token sequences (its default: the reference
      model in memory, forwarded every step), or null when trl is not installed (it is optional).

--model smollm2: SmolLM2-135M-Instruct in every precision the CPU has (bf16 autocast with float32 weights where it
computes bf16 natively, and fp32):
  DPO: --dpo_pairs pairs in the model's chat template (about --prompt_tokens prompt and --response_tokens response
      tokens each, the response closed by <|im_end|>), encoded as step3_rl.train_dpo encodes them and trained through
      the shared Trainer (full fine-tuning, reference log-probs precomputed), against TRL's DPOTrainer on the same
      weights (exported by `python -m llama_mp.convert to_hf`) and the same pairs as text, which it tokenizes itself
      ("same_tokens" checks its batch holds exactly our token rows). The two alternate step by step (ours runs inside
      a TRL callback after each TRL step); the first step of each is a warm-up; tokens/s = the step's real tokens
      (chosen and rejected) / its mean time. TRL's reference: its default (a second model, forwarded every step), or
      precomputed with --trl_precompute_ref.
  PPO: seconds per step by phase (generate / score / update), as for stories260K, the reward model made from the same
      backbone with a fresh head.
Prints one JSON object: {"precisions": {precision: {"dpo": {"ours", "trl", "ratio", "same_tokens", ...},
"ppo_phase_seconds": {...}}}, "targets": DPO ours / TRL >= 2 in every precision, "reason" when one is missed (the
phases of each side's step)}. TRL needs trl, datasets and accelerate (`bash scripts/bench_env.sh`); without them the
DPO peer is null and "trl_skipped" says how to install them. --quick: 2 pairs of short sequences, 1 step each, PPO
with 2 rollouts of 8 tokens (a smoke test).
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (MODELS, SMOLLM2_NAME, StepPhases, default_checkpoint, emit, export_hf,  # noqa: E402
                          hf_model, missing_peers, precisions, release_memory, scratch_dir, smollm2_checkpoint,
                          target, with_reason)
from llama_mp import distributed  # noqa: E402
from llama_mp.checkpoint import load_model  # noqa: E402
from llama_mp.tokenizer import Tokenizer  # noqa: E402
from llama_mp.train import TrainConfig, Trainer  # noqa: E402
from step2_reward_model.reward_model import RewardModel  # noqa: E402
from step3_rl.dpo import dpo_loss  # noqa: E402
from step3_rl.train_dpo import add_reference_logprobs, collate, sequence_logprobs  # noqa: E402
from step3_rl.train_ppo import PPOOptions, run_ppo  # noqa: E402

TOK512 = os.path.join(ROOT, "data/llama2c/tok512.model")
PROMPT_WORD, CHOSEN_WORD, REJECTED_WORD = " the", " and", " was"  # one tok512 token each, every time
PPO_PROMPTS = ["Tell me a story about a cat.", "What is the sun?", "Say something kind.", "Why is the sky blue?"]
PPO_SIZES = dict(rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2, max_gen_len=64)
PPO_QUICK = dict(rollout_batch_size=2, ppo_minibatch_size=2, ppo_epochs=1, max_gen_len=8)


def ppo_phases(ckpt_dir: str, steps: int, info, tokenizer_path: str = TOK512, precision: str = "auto",
               sizes: dict = PPO_SIZES) -> dict:
    rm_dir = scratch_dir("bench_rl_rm_")
    for name in os.listdir(ckpt_dir):
        os.symlink(os.path.join(ckpt_dir, name), os.path.join(rm_dir, name))
    rm = RewardModel(load_model(ckpt_dir))
    torch.save({"head.weight": rm.head.weight.detach(), "head.bias": rm.head.bias.detach()},
               os.path.join(rm_dir, "head.pth"))
    del rm
    prompts = os.path.join(scratch_dir("bench_rl_prompts_"), "prompts.jsonl")
    with open(prompts, "w") as f:
        for text in PPO_PROMPTS:
            f.write(json.dumps({"instruction": text}) + "\n")
    opts = PPOOptions(policy_ckpt=ckpt_dir, reward_ckpt=rm_dir, tokenizer_path=tokenizer_path, prompt_file=prompts,
                      ppo_steps=steps + 1, max_prompt_len=320, max_seq_len=512, rm_query_len=64, rm_response_len=128,
                      rm_max_seq_len=1536, **sizes)
    cfg = TrainConfig(output_dir=scratch_dir("bench_rl_ppo_"), lr=1e-5,
                      micro_batch_size=sizes["ppo_minibatch_size"], warmup_ratio=0.0, precision=precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the frozen reward model's weights
    history = run_ppo(opts, cfg, info, dtype=dtype)[1:]
    phases = {k: sum(h[f"time/{k}"] for h in history) / len(history) for k in ("generate", "score", "update")}
    return {**{k: round(v, 3) for k, v in phases.items()}, "total": round(sum(phases.values()), 3)}


def dpo_loss_fn(module, batch):
    logps = sequence_logprobs(module, batch)
    n = len(logps) // 2
    return dpo_loss(logps[:n], logps[n:], batch["ref"][:n], batch["ref"][n:], 0.1)


def dpo_trainer(model, examples, info, precision: str = "auto", phases: StepPhases = None) -> Trainer:
    """The shared Trainer on train_dpo's loss, reference log-probs precomputed as train_dpo does."""
    add_reference_logprobs(model, examples, len(examples), info, "fp32" if precision == "auto" else precision)
    loss = dpo_loss_fn if phases is None else phases.timed(dpo_loss_fn, "forward")
    config = TrainConfig(output_dir=scratch_dir("bench_rl_dpo_"), lr=1e-6, micro_batch_size=len(examples),
                         warmup_ratio=0.0, epochs=1e6, log_every=0, precision=precision)
    trainer = Trainer(model, model, examples, lambda b: collate(b, "cpu"), loss, config, info)
    if phases is not None:
        trainer._clip_gradients = phases.timed(trainer._clip_gradients, "clip")
        phases.watch(trainer.optimizer)
    return trainer


# ---- stories260K (the default) -----------------------------------------------------------------------------------
def dpo_examples(tokenizer: Tokenizer, n: int) -> tuple[list[dict], list[dict]]:
    """Our encoded pairs and the same pairs as text for TRL: 64 prompt tokens (BOS + 63), 192 per response."""
    word = {w: tokenizer.encode(w, bos=False, eos=False)[0] for w in (PROMPT_WORD, CHOSEN_WORD, REJECTED_WORD)}
    ours, texts = [], []
    for _ in range(n):
        prompt = [tokenizer.bos_id] + [word[PROMPT_WORD]] * 63
        ours.append({"chosen": (prompt, [word[CHOSEN_WORD]] * 192), "rejected": (prompt, [word[REJECTED_WORD]] * 192)})
        texts.append({"prompt": PROMPT_WORD * 63, "chosen": CHOSEN_WORD * 191, "rejected": REJECTED_WORD * 191})
    return ours, texts  # TRL appends EOS to each response: 191 + 1 = 192 tokens


def dpo_ours(model, examples, steps: int, info) -> float:
    trainer = dpo_trainer(model, examples, info)
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return 8 * 2 * 256 * steps / (time.perf_counter() - start)


def word_tokenizer(tokenizer: Tokenizer):
    """A Hugging Face tokenizer that maps the benchmark's three words to exactly tok512's ids (transformers 5 can no
    longer load a bare SentencePiece model), so TRL sees the very token sequences llama_mp trains on."""
    from tokenizers import AddedToken, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id}
    vocab.update({w.strip(): tokenizer.encode(w, bos=False, eos=False)[0]
                  for w in (PROMPT_WORD, CHOSEN_WORD, REJECTED_WORD)})
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken("</s>", special=True), AddedToken("<s>", special=True)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def dpo_trl(model, texts, steps: int):
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    hf = hf_model(model)
    tokenizer = word_tokenizer(Tokenizer(TOK512))
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = DPOConfig(output_dir=scratch_dir("bench_rl_trl_"), per_device_train_batch_size=8,
                       max_steps=steps + 1, learning_rate=1e-6, beta=0.1, logging_steps=1000, save_strategy="no",
                       report_to="none", max_length=512, use_cpu=True, bf16=False, dataloader_num_workers=0,
                       gradient_checkpointing=False)
    trainer = DPOTrainer(model=hf, ref_model=hf_model(model).eval(), args=config,
                         train_dataset=Dataset.from_list(texts * (steps + 1)),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    batch = next(iter(trainer.get_train_dataloader()))  # the sequences must be ours: 16 x 256 tokens
    lengths = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
    trainer.train()
    seconds = sum(times[1:]) / max(1, len(times) - 1)  # the first step is a warm-up
    return 8 * 2 * 256 / seconds, lengths


def bench_stories(opts) -> dict:
    info = distributed.init(1)
    ckpt_dir = default_checkpoint()
    tokenizer = Tokenizer(TOK512)
    phases = ppo_phases(ckpt_dir, opts.ppo_steps, info, sizes=PPO_QUICK if opts.quick else PPO_SIZES)
    examples, texts = dpo_examples(tokenizer, 8)
    model = load_model(ckpt_dir, max_seq_len=512)
    trl = dpo_trl(load_model(ckpt_dir, max_seq_len=512), texts, opts.dpo_steps)
    ours = dpo_ours(model, examples, opts.dpo_steps, info)
    theirs = trl[0] if trl else None
    return {"ppo_phase_seconds": phases, "dpo_tokens_per_s": round(ours, 1),
            "trl_dpo_tokens_per_s": round(theirs, 1) if theirs else None,
            "ratio": round(ours / theirs, 2) if theirs else None,
            "trl_batch_shape": list(trl[1]) if trl and trl[1] is not None else None,
            "threads": opts.threads}


# ---- SmolLM2-135M-Instruct ---------------------------------------------------------------------------------------
def chat_pairs(tokenizer, chat, n: int, prompt_tokens: int, response_tokens: int) -> tuple[list[dict], list[dict]]:
    """n copies of one pair in the chat template, as our encoded examples and as TRL's text: an instruction of repeated
    words padding the templated prompt to about prompt_tokens, and chosen / rejected answers of repeated words closed
    by the template's end of turn, about response_tokens each (one token a word in SmolLM2's byte-level BPE)."""
    from step3_rl.train_dpo import DPOOptions, encode_pair
    frame = len(tokenizer.encode(chat.query("the"), bos=True, eos=False)) - 1
    instruction = " ".join(["the"] * max(1, prompt_tokens - frame))
    words = max(1, response_tokens - 2)  # the end-of-turn token (and the template's newline) close the answer
    pair = {"prompt": instruction, "chosen": " ".join(["and"] * words), "rejected": " ".join(["was"] * words)}
    unlimited = DPOOptions(max_prompt_len=10 ** 6, max_response_len=10 ** 6, max_seq_len=10 ** 6)
    examples = [encode_pair(pair, tokenizer, unlimited, chat) for _ in range(n)]
    text = {"prompt": chat.query(instruction), "chosen": chat.response(pair["chosen"], instruction),
            "rejected": chat.response(pair["rejected"], instruction)}
    return examples, [dict(text) for _ in range(n)]


def same_tokens(batch: dict, examples: list[dict]) -> bool:
    """Whether TRL's batch rows (chosen rows then rejected rows, real tokens only) are exactly our sequences."""
    ours = [list(e[side][0]) + list(e[side][1]) for side in ("chosen", "rejected") for e in examples]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return rows == ours


def dpo_pair(precision: str, ckpt_dir: str, hf_dir, examples: list[dict], texts: list[dict], opts, info) -> dict:
    """Our DPO step and TRL's, alternating (ours runs in a TRL callback after each TRL step)."""
    n_tokens = sum(len(e[s][0]) + len(e[s][1]) for e in examples for s in ("chosen", "rejected"))
    max_len = max(len(e[s][0]) + len(e[s][1]) for e in examples for s in ("chosen", "rejected"))
    ours_phases = StepPhases()
    model = load_model(ckpt_dir, max_seq_len=max_len + 8)
    trainer = dpo_trainer(model, examples, info, precision, ours_phases)
    ours_times = []

    def ours_step():
        if len(ours_times) == 1:  # the first was a warm-up
            ours_phases.reset()
        start = time.perf_counter()
        trainer.train_step()
        ours_times.append(time.perf_counter() - start)

    out = {"tokens_per_step": n_tokens, "pairs": len(examples), "sequence_tokens": max_len}
    if hf_dir is None:
        for _ in range(opts.dpo_steps + 1):
            ours_step()
    else:
        out.update(trl_alternating(precision, hf_dir, examples, texts, opts, ours_step))
    timed = ours_times[1:]
    mean = sum(timed) / len(timed)
    out["ours"] = {"tokens_per_s": round(n_tokens / mean, 1), "ms_per_step": round(mean * 1e3, 1),
                   "phases_ms": ours_phases.split_ms(sum(timed), len(timed))}
    if out.get("trl"):
        out["ratio"] = round(out["ours"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 2)
    return out


def trl_alternating(precision: str, hf_dir: str, examples, texts, opts, ours_step) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    phases, times = StepPhases(("forward", "optimizer")), []  # its clipping is inside accelerate: not timed apart

    class Alternate(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:  # accelerate's wrapper: the torch optimizer inside it runs the step hooks
                phases.watch(getattr(optimizer, "optimizer", optimizer))

        def on_step_begin(self, args, state, control, **kwargs):
            if len(times) == 1:
                phases.reset()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            ours_step()

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    policy = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = None if opts.trl_precompute_ref else LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    max_len = max(len(e[s][0]) + len(e[s][1]) for e in examples for s in ("chosen", "rejected"))
    config = DPOConfig(output_dir=scratch_dir("bench_rl_trl_"), per_device_train_batch_size=len(examples),
                       max_steps=opts.dpo_steps + 1, learning_rate=1e-6, beta=0.1, logging_steps=1000,
                       save_strategy="no", report_to="none", max_length=max_len + 8, use_cpu=True,
                       bf16=precision == "bf16", dataloader_num_workers=0, gradient_checkpointing=False,
                       disable_tqdm=True, precompute_ref_log_probs=opts.trl_precompute_ref)
    dpo = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                     train_dataset=Dataset.from_list(texts * (opts.dpo_steps + 1)), callbacks=[Alternate()])
    dpo.compute_loss = phases.timed(dpo.compute_loss, "forward")  # the policy's (and reference's) forward + loss
    batch = next(iter(dpo.get_train_dataloader()))
    dpo.train()
    timed = times[1:]
    mean = sum(timed) / len(timed)
    trl_tokens = int(batch["attention_mask"].sum())
    result = {"trl": {"tokens_per_s": round(trl_tokens / mean, 1), "ms_per_step": round(mean * 1e3, 1),
                      "phases_ms": phases.split_ms(sum(timed), len(timed), rest="backward_and_rest"),
                      "reference": "precomputed" if opts.trl_precompute_ref else "forwarded every step (TRL default)",
                      "threads": torch.get_num_threads()},
              "same_tokens": same_tokens(batch, examples), "trl_batch_shape": list(batch["input_ids"].shape)}
    del dpo, policy, reference
    release_memory()
    return result


def dpo_reason(dpo: dict) -> str:
    ours, trl = dpo["ours"], dpo["trl"]
    split = lambda ms: ", ".join(f"{k} {v}" for k, v in ms.items())  # noqa: E731
    return (f"ms per step ours {ours['ms_per_step']} ({split(ours['phases_ms'])}) vs TRL {trl['ms_per_step']} "
            f"({split(trl['phases_ms'])}; reference {trl['reference']})")


def bench_smollm2(opts) -> dict:
    from llama_mp.chat import chat_format
    from llama_mp.tokenizer import load_tokenizer
    info = distributed.init(1)
    ckpt_dir = smollm2_checkpoint()
    tokenizer = load_tokenizer("", ckpt_dir)
    chat = chat_format(tokenizer)
    trl_skipped = missing_peers("trl", "datasets", "accelerate", "transformers")
    hf_dir = None if trl_skipped else export_hf(ckpt_dir)
    result = {"model": SMOLLM2_NAME, "threads": opts.threads, "dpo_steps": opts.dpo_steps, "ppo_steps": opts.ppo_steps,
              "ppo_sizes": PPO_QUICK if opts.quick else PPO_SIZES, "precisions": {}}
    if trl_skipped:
        result["trl_skipped"] = trl_skipped
    targets = []
    for precision in precisions():
        examples, texts = chat_pairs(tokenizer, chat, opts.dpo_pairs, opts.prompt_tokens, opts.response_tokens)
        dpo = dpo_pair(precision, ckpt_dir, hf_dir, examples, texts, opts, info)
        release_memory()  # its models are gone with its frame
        ppo = ppo_phases(ckpt_dir, opts.ppo_steps, info, "", precision, PPO_QUICK if opts.quick else PPO_SIZES)
        ppo["dominant"] = max(("generate", "score", "update"), key=ppo.get)
        release_memory()
        result["precisions"][precision] = {"dpo": dpo, "ppo_phase_seconds": ppo}
        targets.append(target(f"DPO tokens/s ours/TRL ({precision})", dpo.get("ratio"), 2.0,
                              why=dpo_reason(dpo) if dpo.get("trl") else trl_skipped))
    return with_reason(result, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="stories260K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dpo_steps", type=int, default=None, help="default: 6 (stories260K), 3 (smollm2)")
    parser.add_argument("--ppo_steps", type=int, default=None, help="default: 3 (stories260K), 2 (smollm2)")
    parser.add_argument("--dpo_pairs", type=int, default=8, help="smollm2: pairs per step")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="smollm2: templated prompt length")
    parser.add_argument("--response_tokens", type=int, default=192, help="smollm2: each response's length")
    parser.add_argument("--trl_precompute_ref", action="store_true",
                        help="smollm2: TRL precomputes the reference log-probs too (as ours does)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny DPO and PPO, one step each")
    opts = parser.parse_args()
    smollm2 = opts.model == "smollm2"
    if opts.quick:
        opts.dpo_steps, opts.ppo_steps, opts.dpo_pairs, opts.prompt_tokens, opts.response_tokens = 1, 1, 2, 40, 16
    opts.dpo_steps = opts.dpo_steps or (3 if smollm2 else 6)
    opts.ppo_steps = opts.ppo_steps or (2 if smollm2 else 3)
    torch.set_num_threads(opts.threads)
    emit(bench_smollm2(opts) if smollm2 else bench_stories(opts))
    distributed.teardown()


if __name__ == "__main__":
    main()
