"""Sample one response per prompt in the policy's chat format (SALMON step 1, run once per seed).

  python -m step1_synthetic_preference.generate_responses --ckpt_dir D --tokenizer_path T \
      --output_file runs/step1/oasst1_response0.jsonl --seed 42 [--prompt_file data/oasst1/oasst1_prompts.json]

Query (--chat_format, llama_mp/chat.py): a base model gets Dromedary's `{meta prompt}\\n{instruction}\\n\\n### Dromedary`,
stopped at "\\n\\n### User"; an instruction model (a checkpoint whose tokenizer carries a chat template, e.g. SmolLM2's
ChatML) gets one user turn in its own template, stopped at its end-of-turn token. Temperature 0.7, top-p 1.0.
Prompts are split across data-parallel replicas; finished records are appended as they go to
`<output>.parts/part-<replica>.jsonl`, a rerun of the same command resumes (nothing lost after a kill -9, no
duplicates), and the end writes <output> atomically, one record per prompt ordered by prompt id:
  {"id", "instruction", "input", "output", "finish_reason", "seed"}
A prompt whose query does not fit max_seq_len - max_gen_len gets "output": null, "finish_reason": "prompt_too_long".
Each prompt is sampled with its own seed (derived from --seed and its id), so its response does not depend on the
batch it ran in or on the number of processes.
"""

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli, jobs
from llama_mp.chat import DEFAULT_META_PROMPT, chat_format
from llama_mp.config import parse_config, require
from llama_mp.prompts import load_prompts
from llama_mp.sampler import derive_seed
from step1_synthetic_preference.common import DEFAULT_PROMPTS


@dataclass
class ResponseOptions(cli.ModelOptions):
    prompt_file: str = field(default=DEFAULT_PROMPTS, metadata={"help": "JSON list or JSONL with instruction/input"})
    meta_prompt_file: str = DEFAULT_META_PROMPT
    chat_format: Literal["auto", "dromedary", "template"] = field(default="auto", metadata={
        "help": "auto: the checkpoint's chat template when its tokenizer has one, else dromedary"})
    output_file: Optional[str] = field(default=None, metadata={"help": "the responses (JSONL)"})
    max_prompts: Optional[int] = field(default=None, metadata={"help": "only the first N prompts of the file"})
    max_gen_len: int = 768
    temperature: float = 0.7
    top_p: float = 1.0
    stop: Optional[str] = field(default=None, metadata={"help": "a stop string (default: the chat format's)"})
    seed: int = field(default=42, metadata={"help": "each prompt's sampling seed derives from it and the prompt's id"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.generate_responses",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing output or unfinished run")
    args, opts = parse_config(parser, ResponseOptions)
    require(opts, "ckpt_dir", "output_file")

    prompts = load_prompts(opts.prompt_file)[:opts.max_prompts]
    info, sampler = cli.build(opts, opts.seed)
    chat = chat_format(sampler.tokenizer, opts.chat_format, opts.meta_prompt_file)
    stop = [opts.stop] if opts.stop else chat.stop
    settings = {k: getattr(opts, k) for k in ("ckpt_dir", "prompt_file", "meta_prompt_file", "chat_format",
                                              "max_prompts", "max_gen_len", "temperature", "top_p", "stop", "seed",
                                              "max_seq_len", "max_batch_size")}
    jobs.prepare(opts.output_file, settings, args.overwrite, info)

    queries = {p["id"]: sampler.encode(chat.query(p["instruction"], p["input"])) for p in prompts}
    limit = sampler.max_seq_len - opts.max_gen_len
    # Chunks of similar length (one micro-batch each): fixed by the prompt set, so a resumed run redoes a chunk
    # exactly as the interrupted one would have.
    ordered = sorted(prompts, key=lambda p: (-len(queries[p["id"]]), p["id"]))

    def process(chunk: list[dict]) -> list[dict]:
        fits = [p for p in chunk if len(queries[p["id"]]) <= limit]
        completions = sampler.generate([queries[p["id"]] for p in fits], opts.max_gen_len, opts.temperature,
                                       opts.top_p, stop=stop, seed=[derive_seed(opts.seed, p["id"]) for p in fits],
                                       desc="responses")
        by_id = {p["id"]: c for p, c in zip(fits, completions)}
        records = []
        for p in chunk:
            c = by_id.get(p["id"])
            records.append({"id": p["id"], "instruction": p["instruction"], "input": p["input"],
                            "output": c.text if c else None,
                            "finish_reason": c.finish_reason if c else "prompt_too_long", "seed": opts.seed})
        return records

    jobs.run(opts.output_file, ordered, lambda p: p["id"], sampler.max_batch_size, process, info, "responses")
    records = jobs.merge(opts.output_file, lambda r: r["id"], info)
    if info.is_main:
        too_long = sum(r["finish_reason"] == "prompt_too_long" for r in records)
        print(f"wrote {len(records)} responses to {opts.output_file}" +
              (f" ({too_long} prompts too long for max_seq_len, output null)" if too_long else ""), flush=True)


if __name__ == "__main__":
    cli.run(main)
