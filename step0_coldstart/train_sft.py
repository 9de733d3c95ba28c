"""Supervised fine-tuning on {prompt, response} records, loss on response tokens only, through the shared loop.

  python -m step0_coldstart.train_sft --ckpt_dir D --tokenizer_path T --train_file runs/tabular/r0/sft_train.jsonl \
      --output_dir runs/tabular/sft [--config configs/sft_tiny.yaml] [--resume]

Prompt and response are tokenized as one text and cut where the prompt's tokens end (the join never changes tokens);
an EOS ends every response so the generator learns to stop. Sequences longer than max_seq_len are an error naming the
record. Every option of the YAML config is also a flag; launch, data parallel x model parallel, checkpoints, --resume and
metrics are the project's shared training loop.
"""

import argparse
from dataclasses import asdict, dataclass

from llama_mp import cli, distributed
from llama_mp.batching import prompt_response_batch
from llama_mp.chat import split_tokens
from llama_mp.checkpoint import check_policy
from llama_mp.lora import load_model
from llama_mp.jsonl import read_records
from llama_mp.logprobs import response_logprobs
from llama_mp.tokenizer import Tokenizer, load_tokenizer
from llama_mp.config import require
from llama_mp.train import Trainer, add_lora, backbone_dtype, parse_task_args


@dataclass
class SFTOptions:
    ckpt_dir: str = ""
    tokenizer_path: str = ""
    train_file: str = ""
    prompt_key: str = "prompt"
    response_key: str = "response"
    max_seq_len: int = 2048


def encode_records(path: str, opts: SFTOptions, tokenizer: Tokenizer) -> list[dict]:
    examples = []
    for position, record in read_records(path):
        prompt, response = record.get(opts.prompt_key), record.get(opts.response_key)
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise ValueError(f"{path}:{position}: needs {opts.prompt_key!r} and a non-empty {opts.response_key!r}")
        prompt_ids, response_ids = split_tokens(tokenizer, prompt, response)
        response_ids = response_ids + [tokenizer.eos_id]
        if len(prompt_ids) + len(response_ids) > opts.max_seq_len:
            raise ValueError(f"{path}:{position}: {len(prompt_ids) + len(response_ids)} tokens exceed max_seq_len "
                             f"{opts.max_seq_len}")
        examples.append({"prompt": prompt_ids, "response": response_ids})
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def collate(examples: list[dict], device) -> dict:
    return prompt_response_batch([(e["prompt"], e["response"]) for e in examples], device)


def response_loss(model, batch: dict):
    """Mean negative log-likelihood of the response tokens (only their positions reach the LM head)."""
    _, logp = response_logprobs(model, batch["tokens"], batch["mask"])
    loss = -logp.sum() / max(len(logp), 1)
    return loss, {"loss": float(loss.detach()), "response_tokens": float(len(logp))}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.train_sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args, layout, train_cfg, opts = parse_task_args(parser, SFTOptions)
    require(opts, "ckpt_dir", "train_file")  # tokenizer_path: default the checkpoint's own tokenizer
    check_policy(opts.ckpt_dir)  # fine-tunes a language model, not a reward model
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    examples = encode_records(opts.train_file, opts, tokenizer)
    info = distributed.init(layout.model_parallel_size, seed=train_cfg.seed)
    model = load_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                       device=info.device, dtype=backbone_dtype(train_cfg, info.device))
    add_lora(model, train_cfg, opts.ckpt_dir)
    trainer = Trainer(model, model, examples, lambda b: collate(b, info.device), response_loss, train_cfg, info,
                      task="sft", tokenizer=tokenizer)
    trainer.run({"sft": asdict(opts)}, f"{len(examples)} examples", resume=args.resume)


if __name__ == "__main__":
    cli.run(main)
