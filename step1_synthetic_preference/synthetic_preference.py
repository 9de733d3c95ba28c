"""Self-judging: the policy compares its two responses to every prompt under every principle, in both orders.

  python -m step1_synthetic_preference.synthetic_preference --ckpt_dir D --tokenizer_path T \
      --response_files runs/step1/oasst1_response0.jsonl runs/step1/oasst1_response1.jsonl \
      --output_file runs/step1/oasst1_preference.jsonl

Responses are joined by prompt id (output_1 from the first file, output_2 from the second), cut at the first "###"
and stripped; a pair is dropped when either text is shorter than --min_response_chars. For each pair and principle
the judge prompt (`synthetic_preference_prompt.txt`) is read in the order (1, 2) and (2, 1), and the next-token logits
of "a" and "b" after "... is Output (" give r12 = La - Lb and r21 = Lb - La (both > 0: output 1 is preferred).
One record per (pair, principle):
  {"id", "example_idx", "principle_index", "dimension", "relative_score": [r12, r21], "prompt_preference"}
where prompt_preference is 1 (both orders prefer output 1), 2 (both prefer output 2) or 0 (the orders disagree).

The instruction and both responses form a prefix shared by all principles of a pair, and the part before Output (a)
is shared by both orders: their keys/values are computed once (--no_prefix_reuse recomputes every prompt). The
judging code is llama_mp/judge.py. Sharded over data-parallel replicas and resumable like generate_responses.
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli, jobs
from llama_mp.chat import chat_format, load_principles
from llama_mp.config import parse_config, require
from llama_mp.judge import DEFAULT_JUDGE_PRINCIPLES, DEFAULT_JUDGE_PROMPT, answer_token_ids, judge_chunk
from llama_mp.jsonl import read_text
from step1_synthetic_preference.common import load_pairs, response_files


@dataclass
class SyntheticPreferenceOptions(cli.ModelOptions):
    response_files: list[str] = field(default_factory=list, metadata={
        "help": "the two response files, RESPONSES_1 RESPONSES_2 (output_1's, output_2's); or response_pattern"})
    response_pattern: Optional[str] = field(default=None, metadata={
        "help": "a glob matching exactly two response files (sorted)"})
    principle_file: str = DEFAULT_JUDGE_PRINCIPLES
    prompt_template: str = DEFAULT_JUDGE_PROMPT
    chat_format: Literal["auto", "dromedary", "template"] = field(default="auto", metadata={
        "help": "auto: the judge prompt inside the checkpoint's chat template when it has one"})
    output_file: Optional[str] = field(default=None, metadata={"help": "the judgments (JSONL)"})
    min_response_chars: int = 16
    max_instruction_tokens: int = field(default=256, metadata={"help": "longer instructions are cut"})
    max_response_tokens: int = field(default=640, metadata={"help": "longer responses are cut"})
    pairs_per_chunk: int = field(default=4, metadata={"help": "pairs judged between two appends"})
    no_prefix_reuse: bool = field(default=False, metadata={"help": "recompute every judge prompt in full"})
    seed: int = field(default=1, metadata={"help": "torch's seed (the judging samples nothing)"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.synthetic_preference",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing output or unfinished run")
    args, opts = parse_config(parser, SyntheticPreferenceOptions)
    require(opts, "ckpt_dir", "output_file")
    files = response_files(opts.response_files, opts.response_pattern)
    pairs, dropped = load_pairs(files, opts.min_response_chars)
    principles = load_principles(opts.principle_file)
    template = read_text(opts.prompt_template)
    info, sampler = cli.build(opts, opts.seed)
    tokenizer = sampler.tokenizer
    id_a, id_b = answer_token_ids(tokenizer)
    chat = chat_format(tokenizer, opts.chat_format)
    settings = {"ckpt_dir": opts.ckpt_dir, "response_files": [os.path.abspath(f) for f in files],
                **{k: getattr(opts, k) for k in ("principle_file", "prompt_template", "chat_format",
                                                 "min_response_chars", "max_instruction_tokens", "max_response_tokens",
                                                 "pairs_per_chunk", "max_seq_len")}}
    jobs.prepare(opts.output_file, settings, args.overwrite, info)
    if info.is_main:
        print(f"[judge] {len(pairs)} pairs x {len(principles)} principles x 2 orders"
              + (f"; {dropped} pairs dropped (a response shorter than {opts.min_response_chars} chars)"
                 if dropped else ""), flush=True)

    def process(chunk: list[dict]) -> list[dict]:
        return judge_chunk(sampler, chat, chunk, principles, template, id_a, id_b, opts.max_instruction_tokens,
                           opts.max_response_tokens, prefix_reuse=not opts.no_prefix_reuse)

    jobs.run(opts.output_file, pairs, lambda p: p["id"], opts.pairs_per_chunk, process, info, "judge")
    records = jobs.merge(opts.output_file, lambda r: (r["id"], r["principle_index"]), info)
    if info.is_main:
        skipped = sum(1 for r in records if r.get("skipped"))
        print(f"wrote {len(records)} judgments to {opts.output_file}"
              + (f" ({skipped} skipped: judge prompt too long)" if skipped else ""), flush=True)


if __name__ == "__main__":
    cli.run(main)
