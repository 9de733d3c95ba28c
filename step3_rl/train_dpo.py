"""DPO on prompt/chosen/rejected pairs, through the project's shared training loop.

  python -m step3_rl.train_dpo --config configs/dpo_tiny.yaml --ckpt_dir D --tokenizer_path T \
      --train_file runs/step1/synthetic_preference_pairs.jsonl --output_dir runs/dpo [--resume]

Pairs: JSONL or a JSON list; prompt/chosen/rejected as plain strings or message lists (OpenRLHF/TRL style: the prompt's
user turns, the chosen/rejected assistant turn; without a prompt key, chosen/rejected are whole conversations and the
prompt is everything before their last message). Key names are options (e.g. --rejected_key reject). The policy sees
its chat format (--prompt_format auto: the checkpoint's chat template when its tokenizer has one, else Dromedary's;
`dromedary` or `template` to choose; `plain` uses the prompt text as is); log-probs are summed over response
tokens only. Reference log-probs come from the initial policy (with LoRA: the base with its adapters off), computed once
before training: no second model is held during updates. Every option of the YAML config is also a flag.
"""

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from llama_mp import cli, distributed, lora
from llama_mp.checkpoint import check_policy
from llama_mp.batching import prompt_response_batch
from llama_mp.chat import DEFAULT_META_PROMPT, ChatFormat, chat_format, split_tokens
from llama_mp.lora import load_model
from llama_mp.jsonl import read_records, write_json_atomic
from llama_mp.tokenizer import Tokenizer, load_tokenizer
from llama_mp.config import require
from llama_mp.train import (Trainer, add_lora, backbone_dtype, compute_context, parse_task_args,
                            resolve_precision)
from step3_rl.dpo import dpo_loss, response_logprobs


@dataclass
class DPOOptions:
    ckpt_dir: str = ""
    tokenizer_path: str = ""
    train_file: str = ""
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    prompt_format: Literal["auto", "dromedary", "template", "plain"] = "auto"  # llama_mp/chat.py; plain: as given
    meta_prompt_file: str = DEFAULT_META_PROMPT
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    max_prompt_len: int = 256
    max_response_len: int = 512
    max_seq_len: int = 1024



def _text(value, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return "\n\n".join(m["content"] for m in value)
    raise ValueError(f"{where}: {key!r} must be a string or a list of {{role, content}} messages")


def read_pairs(path: str, opts: DPOOptions) -> list[dict]:
    """[{"prompt", "chosen", "rejected"}] as plain text."""
    pairs = []
    for position, record in read_records(path):
        where = f"{path}:{position}"
        for key in (opts.chosen_key, opts.rejected_key):
            if key not in record:
                raise ValueError(f"{where}: no {key!r} field (set --chosen_key/--rejected_key)")
        chosen, rejected = record[opts.chosen_key], record[opts.rejected_key]
        if opts.prompt_key in record:
            prompt = _text(record[opts.prompt_key], where, opts.prompt_key)
        elif isinstance(chosen, list) and len(chosen) >= 2:  # whole conversations: the prompt is all but the last
            prompt = _text(chosen[:-1], where, opts.chosen_key)
            chosen, rejected = chosen[-1:], rejected[-1:] if isinstance(rejected, list) else rejected
        else:
            raise ValueError(f"{where}: no {opts.prompt_key!r} field and no conversation to take the prompt from")
        chosen, rejected = _text(chosen, where, opts.chosen_key), _text(rejected, where, opts.rejected_key)
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"{where}: empty chosen or rejected response")
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def encode_pair(pair: dict, tokenizer: Tokenizer, opts: DPOOptions, chat: Optional[ChatFormat]) -> dict:
    """Token ids and response masks of both sequences; the prompt is cut from the left, responses from the right.
    chat None: the plain format (prompt text as is)."""
    query = chat.query(pair["prompt"]) if chat else pair["prompt"]
    out = {}
    for side in ("chosen", "rejected"):
        # Dromedary's answer starts on a new line; a template's ends with its end-of-turn token
        response = chat.response(pair[side], pair["prompt"]) if chat else pair[side]
        prompt_ids, response_ids = split_tokens(tokenizer, query, response)
        if len(prompt_ids) > opts.max_prompt_len:
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - opts.max_prompt_len + 1:]  # keep BOS
        response_ids = response_ids[:opts.max_response_len]
        if not response_ids:
            raise ValueError(f"pair with prompt {pair['prompt'][:40]!r}: empty {side} response after tokenization")
        if len(prompt_ids) + len(response_ids) > opts.max_seq_len:
            raise ValueError(f"pair with prompt {pair['prompt'][:40]!r}: {len(prompt_ids) + len(response_ids)} tokens "
                             f"exceed max_seq_len {opts.max_seq_len}")
        out[side] = (prompt_ids, response_ids)
    return out


def collate(examples: list[dict], device) -> dict:
    """Chosen sequences then rejected ones, right-padded, with response masks and reference log-probs."""
    batch = prompt_response_batch([e[side] for side in ("chosen", "rejected") for e in examples], device)
    batch["ref"] = torch.tensor([e.get(f"ref_{side}", float("nan")) for side in ("chosen", "rejected")
                                 for e in examples], device=device)  # NaN until filled in: never a silent 0
    return batch


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    return response_logprobs(model, batch["tokens"], batch["mask"])


@torch.no_grad()
def add_reference_logprobs(model, examples: list[dict], batch_size: int, info, precision: str = "fp32") -> None:
    """ref_chosen / ref_rejected for every example from the initial policy (with LoRA: the base, adapters off), in the
    training's precision; replicas split the work and share it."""
    model.eval()
    mine = list(range(info.data_parallel_rank, len(examples), info.data_parallel_size))
    results = {}
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        with lora.adapters_off(model), compute_context(precision, info.device):
            logps = sequence_logprobs(model, collate([examples[i] for i in idx], info.device)).cpu().tolist()
        for j, i in enumerate(idx):
            results[i] = (logps[j], logps[len(idx) + j])
    if info.data_parallel_size > 1:
        from fairscale.nn.model_parallel import initialize as fs_init
        gathered = [None] * info.data_parallel_size
        dist.all_gather_object(gathered, results, group=fs_init.get_data_parallel_group())
        results = {k: v for part in gathered for k, v in part.items()}
    for i, (chosen, rejected) in results.items():
        examples[i]["ref_chosen"], examples[i]["ref_rejected"] = chosen, rejected


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step3_rl.train_dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args, layout, train_cfg, opts = parse_task_args(parser, DPOOptions)
    require(opts, "ckpt_dir", "train_file")  # tokenizer_path: default the checkpoint's own tokenizer
    check_policy(opts.ckpt_dir)
    pairs = read_pairs(opts.train_file, opts)
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    chat = None if opts.prompt_format == "plain" else chat_format(tokenizer, opts.prompt_format, opts.meta_prompt_file)
    examples = [encode_pair(p, tokenizer, opts, chat) for p in pairs]

    info = distributed.init(layout.model_parallel_size, seed=train_cfg.seed)
    model = load_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                       device=info.device, dtype=backbone_dtype(train_cfg, info.device))
    add_lora(model, train_cfg, opts.ckpt_dir)
    refs_file = os.path.join(train_cfg.output_dir, "reference_logprobs.json")
    fingerprint = hashlib.sha256(json.dumps([[e["chosen"], e["rejected"]] for e in examples]).encode()).hexdigest()
    if not args.resume or not os.path.exists(os.path.join(train_cfg.output_dir, "latest")):
        add_reference_logprobs(model, examples, train_cfg.micro_batch_size, info,
                               resolve_precision(train_cfg.precision, info.device))
        if info.is_main:
            os.makedirs(train_cfg.output_dir, exist_ok=True)
            write_json_atomic(refs_file, {"pairs_sha256": fingerprint,
                                          "logprobs": [[e["ref_chosen"], e["ref_rejected"]] for e in examples]})
    else:  # the reference is the initial policy: its log-probs were saved by the first run
        with open(refs_file) as f:
            saved = json.load(f)
        if saved.get("pairs_sha256") != fingerprint:
            raise ValueError(f"{refs_file}: made for other pairs than {opts.train_file} gives now; cannot resume")
        for e, (chosen, rejected) in zip(examples, saved["logprobs"]):
            e["ref_chosen"], e["ref_rejected"] = chosen, rejected

    def loss(module, batch):
        logps = sequence_logprobs(module, batch)
        n = len(logps) // 2
        return dpo_loss(logps[:n], logps[n:], batch["ref"][:n], batch["ref"][n:], opts.beta, opts.label_smoothing,
                        opts.loss_type)

    trainer = Trainer(model, model, examples, lambda b: collate(b, info.device), loss, train_cfg, info, task="dpo",
                      tokenizer=tokenizer)
    trainer.run({"dpo": asdict(opts)}, f"{len(examples)} pairs", resume=args.resume)


if __name__ == "__main__":
    cli.run(main)
