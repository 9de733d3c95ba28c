"""Complete prompts with the KV-cache sampler.

  python -m llama_mp.generate --ckpt_dir D --tokenizer_path T --prompt "Once upon a time" [--prompt ...]
  python -m llama_mp.generate --ckpt_dir D --tokenizer_path T --prompts_file IN.jsonl --output_file OUT.jsonl

A prompts file has one JSON object per line with a "prompt" string; other fields are copied to the output, which adds
"generation", "finish_reason" (eos | stop | length), "tokens" and "logprobs". Runs unchanged under python, torchrun and
srun: prompts are split across data-parallel replicas and rank 0 writes the output file (atomically, in input order).
Each prompt is sampled with its own seed (from --seed and its position), so results do not depend on the number of
processes or the batching.

--chat_format (default auto) says how a prompt reaches the model:
  none       the prompt is completed as given (a base model: stories260K, Llama-2)
  template   the prompt is a user turn of the checkpoint's own chat template (tokenizer_config.json's chat_template:
             ChatML for SmolLM2), followed by the assistant's generation prompt; the turn's end is a stop id
  dromedary  the prompt is the instruction of a Dromedary query (llama_mp/chat.py), "\n\n### User" stops it
  auto       template when the tokenizer carries a chat template (an instruction model), else none
"""

import argparse
import codecs
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch.distributed as dist

from llama_mp import cli, outputs
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.chat import chat_format
from llama_mp.jsonl import iter_jsonl, write_jsonl_atomic


@dataclass
class GenerateOptions(cli.ModelOptions):
    prompt: list[str] = field(default_factory=list, metadata={"help": "a prompt (repeat the flag for several)"})
    prompts_file: Optional[str] = field(default=None, metadata={"help": 'JSONL with a "prompt" field per line'})
    output_file: Optional[str] = field(default=None, metadata={"help": "JSONL output (required with prompts_file)"})
    max_gen_len: PositiveInt = 64
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = field(default=0, metadata={"help": "0: off"})
    stop: list[str] = field(default_factory=list, metadata={
        "help": 'stop strings, e.g. "\\n\\n### User" (a flag\'s backslash escapes are read as Python\'s)'})
    chat_format: Literal["auto", "none", "template", "dromedary"] = field(default="auto", metadata={
        "help": "how prompts are wrapped (see above); auto: the checkpoint's chat template if it has one"})
    truncate: Literal["error", "left"] = field(default="error", metadata={
        "help": "a prompt too long for max_seq_len - max_gen_len: refuse it, or keep BOS + its end"})
    seed: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_mp.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file")
    args, opts = parse_config(parser, GenerateOptions)
    if bool(opts.prompt) == bool(opts.prompts_file):
        raise ValueError("give either --prompt (one or more) or --prompts_file")
    stops = [codecs.escape_decode(s.encode())[0].decode() for s in opts.stop]  # the shell passes "\n" as 2 chars

    if opts.prompts_file:
        require(opts, "output_file")
        records = []
        for line, record in iter_jsonl(opts.prompts_file):
            if not isinstance(record.get("prompt"), str):
                raise ValueError(f"{opts.prompts_file}:{line}: record has no \"prompt\" string")
            records.append(record)
        if not records:
            raise ValueError(f"{opts.prompts_file}: no prompt records")
    else:
        records = [{"prompt": p} for p in opts.prompt]

    info, sampler = cli.build(opts, opts.seed)
    if opts.output_file and info.is_main:  # after every input loaded: one refuse-to-overwrite rule (llama_mp/outputs.py)
        outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    choice = opts.chat_format
    if choice == "auto":  # an instruction model (its tokenizer carries a chat template) gets it, a base model nothing
        choice = "template" if sampler.tokenizer.chat_template else "none"
    wrap, stop = (lambda prompt: prompt), stops
    if choice != "none":
        chat = chat_format(sampler.tokenizer, choice)
        wrap, stop = chat.query, stops + [s for s in chat.stop if s not in stops]
    mine = list(range(info.data_parallel_rank, len(records), info.data_parallel_size))
    completions = sampler.generate([wrap(records[i]["prompt"]) for i in mine], opts.max_gen_len, opts.temperature,
                                   opts.top_p, opts.top_k, stop, seed=[opts.seed * 1_000_003 + i for i in mine],
                                   truncate=opts.truncate)
    results = [(i, {**records[i], "generation": c.text, "finish_reason": c.finish_reason, "tokens": c.tokens,
                    "logprobs": c.logprobs}) for i, c in zip(mine, completions)]
    if info.world_size > 1:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, results if info.model_parallel_rank == 0 else [])
        results = [r for part in gathered for r in part]
    if not info.is_main:
        return
    results = [record for _, record in sorted(results, key=lambda pair: pair[0])]
    if opts.output_file:
        write_jsonl_atomic(opts.output_file, results)
        outputs.complete([opts.output_file])
        cli.log(f"wrote {len(results)} completions to {opts.output_file}")
    else:
        for record in results:
            print(f"{record['prompt']}{record['generation']}\n[{record['finish_reason']}]\n", flush=True)


if __name__ == "__main__":
    cli.run(main)
