"""Train the principle-following reward model on step 1's aggregated preferences.

  python -m step2_reward_model.train_reward_model --config configs/reward_model_tiny.yaml \
      [--ckpt_dir D --tokenizer_path T --train_file runs/step1/synthetic_preference.json --output_dir runs/rm] [--resume]

Every option of the YAML config is also a flag (flags win). Pairs (step 1's JSON list, or any file of records with
instruction/input/output_1/output_2/preference) are split by prompt id into train and a held-out part
(--eval_fraction); the human check uses the ranked sibling answers of OASST1 (--human_eval_file; --human_eval_against
worst with --human_eval_max_pairs N reads the same pairs as step 1's judge agreement with --max_pairs N). Checkpoints go to
<output_dir>/checkpoint-N (Meta layout + head.pth + trainer state); --resume continues the latest one.

<output_dir>/eval.json (written by rank 0 at the end; the same figures are eval/* in metrics.jsonl every --eval_every
steps) holds: step, train_loss, train_accuracy (the last training step's);
  heldout_accuracy, heldout_margin, heldout_pairs: the share of held-out pairs whose chosen response scores higher, the
    mean r_chosen - r_rejected, the number of held-out pairs; a held-out pair is scored against the judge's own
    preference: where step 1 flipped its label on purpose (label noise, "flip": true), the flip is undone, since no
    model can predict a coin (with 10% noise a perfect model would score 0.9);
  heldout_flip_rate, heldout_flip_rate_untied, heldout_flip_pairs, heldout_flip_skipped: instructability
    (step2_reward_model/instructability.py's flip_rate): of the flip_pairs held-out pairs that can be negated, the
    share whose preferred response flips when each of the pair's principles is replaced by its negation (definition
    -> negative_definition, and a principle step 1 negated back to its definition); _untied leaves out the pairs tied
    under either prompt; the rates are null when there is no pair to compare; flip_skipped: the held-out pairs that
    cannot be negated (explicit "principles" lists, a principle without a negative_definition), left out of the rates;
  human_accuracy, human_margin, human_pairs: the same on the OASST1 human pairs (under the first --default_principles).
The heldout_* keys are absent when no pair is held out, the human_* keys when --human_eval_file is empty.

Preference-model pre-training (the reference's two stages): train on a general pair file first, then run again with
--ckpt_dir pointing at that run's checkpoint (its head.pth is loaded) and the synthetic pairs as --train_file. Human
pairs as training pairs must come from other prompts than the human check reads (step2_reward_model.human_pairs
--skip_prompts): a training file holding any of them, by id or by instruction, is refused.
"""

import argparse
import ast
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from llama_mp import cli, distributed
from llama_mp.chat import load_principles
from llama_mp.jsonl import read_records, write_json_atomic
from llama_mp.prompts import prompt_keys, shares_prompt
from llama_mp.tokenizer import load_tokenizer
from llama_mp.config import require
from llama_mp.train import (Trainer, add_lora, backbone_dtype, compute_context, parse_task_args,
                            resolve_precision)
from step2_reward_model.human_pairs import MESSAGES, oasst_human_pairs
from step2_reward_model.instructability import flip_rate
from step2_reward_model.reward_model import (DATA, DEFAULT_RM_PROMPT, PromptBuilder, load_reward_model, pad_batch,
                                             pairwise_loss)


@dataclass
class RewardModelOptions:
    ckpt_dir: str = ""
    tokenizer_path: str = ""
    train_file: str = ""
    principle_file: str = os.path.join(DATA, "salmon/principle_collection_rm.json")
    prompt_template: str = DEFAULT_RM_PROMPT
    human_eval_file: str = MESSAGES
    human_eval_against: str = "all"  # all: best vs every lower-ranked answer (355 pairs); worst: vs the worst (186)
    human_eval_max_pairs: int = 0  # > 0: the first N pairs (with `worst`: the pairs step 1's judge agreement reads)
    eval_fraction: float = 0.1
    query_len: int = 128
    response_len: int = 768
    max_seq_len: int = 1280
    margin: float = 0.0
    default_principles: int = 5  # pairs without principles are judged under the first N (the reference's rule)



def load_principles_by_name(path: str) -> tuple[dict[str, dict], list[dict]]:
    principles = load_principles(path)
    return {p["dimension"]: p for p in principles}, principles


def negation(principle: dict, negated: bool):
    """The text that says the opposite of this principle as used: its negative_definition, or, where step 1 had
    already negated it, its definition again. None when the principle file gives it no negative_definition."""
    text = principle.get("definition" if negated else "negative_definition")
    return text if isinstance(text, str) else None


def pair_examples(path: str, opts: RewardModelOptions) -> list[dict]:
    """Step-1 records -> {"id", "instruction", "chosen", "rejected", "principles", "negated_principles", "margin",
    "label_noise"}; bad records are errors. negated_principles: each principle replaced by its negation (see
    `negation`), for the instructability figure; None when the pair cannot be negated (an explicit "principles" list
    of free text, a principle without a negative_definition, no principles at all). label_noise: step 1 flipped the
    label on purpose ("flip": true)."""
    by_name, ordered = load_principles_by_name(opts.principle_file)
    examples = []
    for position, r in read_records(path):
        where = f"{path}:{position}"
        if r.get("preference") not in (1, 2):
            raise ValueError(f"{where}: \"preference\" must be 1 or 2, got {r.get('preference')!r}")
        for key in ("instruction", "output_1", "output_2"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"{where}: {key!r} is missing or empty")
        if r.get("dimensions"):  # step 1 writes these beside the principles' texts: they name what to negate
            try:
                names = ast.literal_eval(r["dimensions"])
                negated = ast.literal_eval(r.get("negative_definitions") or str((0,) * len(names)))
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: \"dimensions\"/\"negative_definitions\" must be tuples as step 1 writes "
                                 f"them, e.g. \"('Concise',)\" and \"(0,)\"") from None
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"{where}: principle {unknown[0]!r} is not in {opts.principle_file}")
            lacking = [n for n, neg in zip(names, negated) if neg and "negative_definition" not in by_name[n]]
            if lacking:
                raise ValueError(f"{opts.principle_file}: principle {lacking[0]!r} has no negative_definition, "
                                 f"which {where} needs")
            principles = [by_name[n]["negative_definition" if neg else "definition"] for n, neg in zip(names, negated)]
            negated_principles = [negation(by_name[n], bool(neg)) for n, neg in zip(names, negated)]
        elif isinstance(r.get("principles"), list):
            principles, negated_principles = r["principles"], None
        else:
            principles = [p["definition"] for p in ordered[:opts.default_principles]]
            negated_principles = [negation(p, False) for p in ordered[:opts.default_principles]]
        if negated_principles is not None and (not negated_principles or None in negated_principles):
            negated_principles = None
        instruction = f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]
        chosen, rejected = (r["output_1"], r["output_2"]) if r["preference"] == 1 else (r["output_2"], r["output_1"])
        pid = r.get("id") or hashlib.sha1(instruction.encode()).hexdigest()[:16]
        examples.append({"id": pid, "instruction": instruction, "chosen": chosen, "rejected": rejected,
                         "principles": principles, "negated_principles": negated_principles,
                         "margin": float(r.get("margin", 0.0) or 0.0), "label_noise": r.get("flip") is True})
    if not examples:
        raise ValueError(f"{path}: no preference pairs")
    return examples


def denoised(example: dict) -> dict:
    """The pair with step 1's deliberate label flip undone: chosen is the response the judge preferred."""
    if not example["label_noise"]:
        return example
    return {**example, "chosen": example["rejected"], "rejected": example["chosen"], "label_noise": False}


def held_out(pid: str, fraction: float) -> bool:
    """A stable split by prompt id: all passes of one prompt fall on the same side."""
    return int(hashlib.sha1(pid.encode()).hexdigest()[:8], 16) / 16 ** 8 < fraction


@torch.no_grad()
def pair_rewards(rm, pairs: list[dict], micro_batch_size: int, precision: str, device) -> torch.Tensor:
    """Rewards [N, 2] (chosen, rejected; float32) of encoded pairs ({"chosen", "rejected"}: token lists), both
    responses of micro_batch_size pairs in one forward pass, in the training compute context."""
    rm.eval()
    out = []
    for start in range(0, len(pairs), micro_batch_size):
        batch = pairs[start:start + micro_batch_size]
        tokens, positions = pad_batch([e["chosen"] for e in batch] + [e["rejected"] for e in batch], device)
        with compute_context(precision, device):  # as in training
            rewards = rm(tokens, positions)
        out.append(torch.stack([rewards[:len(batch)], rewards[len(batch):]], dim=1).float())
    return torch.cat(out) if out else torch.empty(0, 2, device=device)


def accuracy_and_margin(rm, data: list[dict], micro_batch_size: int, precision: str, info,
                        flips: bool = False) -> dict:
    """{"accuracy", "margin", "pairs"} of encoded pairs; with flips, also instructability: {"flip_rate",
    "flip_rate_untied", "flip_pairs", "flip_skipped"} over the pairs carrying a "negated" encoding (the same pair
    under its negated principles; the others count in flip_skipped). Each data-parallel rank scores its slice; the
    counts are summed over the data-parallel group before the rates are formed."""
    mine = data[info.data_parallel_rank::info.data_parallel_size]
    rewards = pair_rewards(rm, mine, micro_batch_size, precision, info.device)
    diff = (rewards[:, 0] - rewards[:, 1]).double()
    # correct, sum of margins, pairs, then for flips: pairs compared, flips, ties, pairs skipped
    sums = torch.zeros(7, dtype=torch.float64, device=info.device)
    sums[0], sums[1], sums[2] = (diff > 0).double().sum(), diff.sum(), len(mine)
    if flips:
        negatable = [i for i, e in enumerate(mine) if e.get("negated") is not None]
        if negatable:
            negated = pair_rewards(rm, [mine[i]["negated"] for i in negatable], micro_batch_size, precision,
                                   info.device)
            counts = flip_rate(rewards[negatable].tolist(), negated.tolist())  # the one definition of a flip
            sums[3:6] = torch.tensor([counts["pairs"], counts["flips"], counts["ties"]], dtype=torch.float64)
        sums[6] = len(mine) - len(negatable)
    if info.data_parallel_size > 1:
        from fairscale.nn.model_parallel import initialize as fs_init
        torch.distributed.all_reduce(sums, group=fs_init.get_data_parallel_group())
    count = max(float(sums[2]), 1.0)
    out = {"accuracy": float(sums[0]) / count, "margin": float(sums[1]) / count, "pairs": int(sums[2])}
    if flips:
        pairs, flipped, ties = (int(x) for x in sums[3:6].tolist())
        out.update({"flip_rate": flipped / pairs if pairs else None,
                    "flip_rate_untied": flipped / (pairs - ties) if pairs > ties else None,
                    "flip_pairs": pairs, "flip_skipped": int(sums[6])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step2_reward_model.train_reward_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args, layout, train_cfg, opts = parse_task_args(parser, RewardModelOptions)
    require(opts, "ckpt_dir", "train_file")  # tokenizer_path: default the checkpoint's own tokenizer

    examples = pair_examples(opts.train_file, opts)
    train = [e for e in examples if not held_out(e["id"], opts.eval_fraction)]
    held = [denoised(e) for e in examples if held_out(e["id"], opts.eval_fraction)]
    if not train:
        raise ValueError(f"{opts.train_file}: every pair fell in the held-out part (eval_fraction {opts.eval_fraction})")
    _, ordered = load_principles_by_name(opts.principle_file)
    human = (oasst_human_pairs(opts.human_eval_file, [p["definition"] for p in ordered[:opts.default_principles]],
                               opts.human_eval_against) if opts.human_eval_file else [])
    human = human[:opts.human_eval_max_pairs] if opts.human_eval_max_pairs > 0 else human
    # human pairs as training pairs (PMP) must come from other prompts than the human check's: by message id (what
    # step2_reward_model.human_pairs writes) or by instruction. (Only this run's file: a run started from a PMP
    # checkpoint should pass the same bounded human check, as the quickstart does.)
    trained = prompt_keys(examples)
    shared = [h for h in human if shares_prompt(h, trained)]
    if shared:
        raise ValueError(f"{opts.train_file}: holds {len(shared)} prompts of the human check "
                         f"({opts.human_eval_file}); take the training pairs from other prompts (human_pairs "
                         f"--skip_prompts) or check fewer (--human_eval_max_pairs)")

    info = distributed.init(layout.model_parallel_size, seed=train_cfg.seed)
    rm = load_reward_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                           device=info.device, dtype=backbone_dtype(train_cfg, info.device))
    add_lora(rm.model, train_cfg, opts.ckpt_dir)
    precision = resolve_precision(train_cfg.precision, info.device)
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    builder = PromptBuilder(tokenizer, open(opts.prompt_template, encoding="utf-8").read(),
                            opts.query_len, opts.response_len)

    def encode(example: dict, negate: bool = False) -> dict:
        """Token lists of the pair under its principles; with negate (held-out pairs), also under the negated
        principles as "negated" (None when the pair cannot be negated)."""
        under = [example["principles"]]
        if negate and example.get("negated_principles") is not None:
            under.append(example["negated_principles"])
        encoded = [{k: builder.encode(example["instruction"], example[k], principles) for k in ("chosen", "rejected")}
                   for principles in under]
        longest = max(len(v) for pair in encoded for v in pair.values())
        if longest > opts.max_seq_len:
            raise ValueError(f"{opts.train_file}: pair {example['id']} needs {longest} tokens, more than max_seq_len "
                             f"{opts.max_seq_len}; lower query_len/response_len or raise max_seq_len")
        out = {**encoded[0], "margin": example["margin"]}
        if negate:
            out["negated"] = encoded[1] if len(encoded) > 1 else None
        return out

    train_data, human_data = ([encode(e) for e in part] for part in (train, human))
    held_data = [encode(e, negate=True) for e in held]

    def collate(batch: list[dict]) -> dict:
        tokens, positions = pad_batch([e["chosen"] for e in batch] + [e["rejected"] for e in batch], info.device)
        return {"tokens": tokens, "positions": positions, "num_tokens": int(positions.sum()) + len(positions),
                "margin": torch.tensor([e["margin"] for e in batch], device=info.device)}

    def loss(module, batch):
        rewards = module(batch["tokens"], batch["positions"])
        n = len(rewards) // 2
        return pairwise_loss(rewards[:n], rewards[n:], batch["margin"] if opts.margin == 0 else
                             torch.full_like(batch["margin"], opts.margin))

    def evaluate() -> dict:
        out = {}
        for name, data in (("heldout", held_data), ("human", human_data)):
            if data:
                metrics = accuracy_and_margin(rm, data, train_cfg.micro_batch_size, precision, info,
                                              flips=name == "heldout")
                out.update({f"{name}_{k}": v for k, v in metrics.items()})
        return out

    trainer = Trainer(rm, rm.model, train_data, collate, loss, train_cfg, info, evaluate=evaluate, task="reward model",
                      tokenizer=tokenizer)
    final = trainer.run({"reward_model": asdict(opts)}, f"{len(train_data)} train pairs, {len(held_data)} held out, "
                        f"{len(human_data)} human pairs", resume=args.resume)
    results = evaluate()
    if info.is_main:
        summary = {"step": trainer.step, "train_loss": final.get("loss"), "train_accuracy": final.get("accuracy"),
                   **results}
        write_json_atomic(os.path.join(train_cfg.output_dir, "eval.json"), summary)
        print(f"[reward model] evaluation: {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    cli.run(main)
