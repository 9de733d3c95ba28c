"""PPO phase timings and DPO training throughput vs Hugging Face TRL, on stories260K, in one run.

  python scripts/bench_rl.py [--threads 2] [--dpo_steps 6] [--ppo_steps 3]

Prints one JSON object:
  ppo_phase_seconds: mean seconds per PPO step in generation / scoring / update (8 rollouts of 64 tokens, a reward
      model made from the same backbone with a fresh head; the first step is a warm-up and not counted);
  dpo_tokens_per_s: the shared training loop's DPO step at 8 pairs of 64 prompt + 192 response tokens, counting chosen
      and rejected sequences (reference log-probs precomputed, as train_dpo does);
  trl_dpo_tokens_per_s: TRL's DPOTrainer on the same weights and the same token sequences (its default: the reference
      model in memory, forwarded every step), or null when trl is not installed (it is optional).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import default_checkpoint, hf_model  # noqa: E402
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


def ppo_phases(ckpt_dir: str, steps: int, info) -> dict:
    rm_dir = tempfile.mkdtemp(prefix="bench_rl_rm_")
    for name in os.listdir(ckpt_dir):
        os.symlink(os.path.join(ckpt_dir, name), os.path.join(rm_dir, name))
    rm = RewardModel(load_model(ckpt_dir))
    torch.save({"head.weight": rm.head.weight.detach(), "head.bias": rm.head.bias.detach()},
               os.path.join(rm_dir, "head.pth"))
    prompts = os.path.join(tempfile.mkdtemp(), "prompts.jsonl")
    with open(prompts, "w") as f:
        for text in ["Tell me a story about a cat.", "What is the sun?", "Say something kind.", "Why is the sky blue?"]:
            f.write(json.dumps({"instruction": text}) + "\n")
    opts = PPOOptions(policy_ckpt=ckpt_dir, reward_ckpt=rm_dir, tokenizer_path=TOK512, prompt_file=prompts,
                      ppo_steps=steps + 1, rollout_batch_size=8, ppo_minibatch_size=4, ppo_epochs=2, max_gen_len=64,
                      max_prompt_len=320, max_seq_len=512, rm_query_len=64, rm_response_len=128, rm_max_seq_len=1536)
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(prefix="bench_rl_ppo_"), lr=1e-5, micro_batch_size=4,
                      warmup_ratio=0.0)
    history = run_ppo(opts, cfg, info)[1:]
    phases = {k: sum(h[f"time/{k}"] for h in history) / len(history) for k in ("generate", "score", "update")}
    return {**{k: round(v, 3) for k, v in phases.items()}, "total": round(sum(phases.values()), 3)}


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
    add_reference_logprobs(model, examples, 8, info)

    def loss(module, batch):
        logps = sequence_logprobs(module, batch)
        n = len(logps) // 2
        return dpo_loss(logps[:n], logps[n:], batch["ref"][:n], batch["ref"][n:], 0.1)

    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="bench_rl_dpo_"), lr=1e-6, micro_batch_size=8,
                         warmup_ratio=0.0, epochs=1e6, log_every=0)
    trainer = Trainer(model, model, examples, lambda b: collate(b, "cpu"), loss, config, info)
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

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_rl_trl_"), per_device_train_batch_size=8,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dpo_steps", type=int, default=6)
    parser.add_argument("--ppo_steps", type=int, default=3)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    info = distributed.init(1)
    ckpt_dir = default_checkpoint()
    tokenizer = Tokenizer(TOK512)
    phases = ppo_phases(ckpt_dir, opts.ppo_steps, info)
    examples, texts = dpo_examples(tokenizer, 8)
    model = load_model(ckpt_dir, max_seq_len=512)
    trl = dpo_trl(load_model(ckpt_dir, max_seq_len=512), texts, opts.dpo_steps)
    ours = dpo_ours(model, examples, opts.dpo_steps, info)
    theirs = trl[0] if trl else None
    print(json.dumps({"ppo_phase_seconds": phases, "dpo_tokens_per_s": round(ours, 1),
                      "trl_dpo_tokens_per_s": round(theirs, 1) if theirs else None,
                      "ratio": round(ours / theirs, 2) if theirs else None,
                      "trl_batch_shape": list(trl[1]) if trl and trl[1] is not None else None,
                      "threads": opts.threads}))
    distributed.teardown()


if __name__ == "__main__":
    main()
