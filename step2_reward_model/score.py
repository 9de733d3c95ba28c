"""The reward of (instruction, response, principles) under a trained reward model.

  python -m step2_reward_model.score --ckpt_dir runs/rm/checkpoint-N --tokenizer_path T \
      --instruction "How do I boil an egg?" --response "Put it in boiling water for 8 minutes." [--response ...] \
      [--principle "The AI should be concise." ...] [--prompt_template data/salmon/salmon_reward_model_prompt_v1.txt]

Prints JSON: one {"response", "reward"} per --response. Without --principle, the first --num_principles definitions of
--principle_file are used. `reward_model.RewardScorer` is the same thing for Python callers (PPO).
"""

import argparse
import json
from dataclasses import dataclass, field
from typing import Optional

from llama_mp import cli, distributed
from llama_mp.chat import load_principles
from llama_mp.checkpoint import check_reward_model
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.tokenizer import load_tokenizer
from step2_reward_model.reward_model import (DATA, DEFAULT_RM_PROMPT, PromptBuilder, RewardScorer, load_reward_model,
                                             read_template)


@dataclass
class RewardScoreOptions(cli.Layout):
    ckpt_dir: Optional[str] = field(default=None, metadata={
        "help": "a reward-model checkpoint (Meta layout + head.pth)"})
    tokenizer_path: Optional[str] = field(default=None, metadata={"help": "default: the one ckpt_dir carries"})
    instruction: Optional[str] = None
    response: list[str] = field(default_factory=list, metadata={"help": "a response to score (repeat the flag)"})
    principle: list[str] = field(default_factory=list, metadata={
        "help": "a principle (repeat the flag; default: the first num_principles of principle_file)"})
    principle_file: str = f"{DATA}/salmon/principle_collection_rm.json"
    num_principles: int = 5
    prompt_template: str = DEFAULT_RM_PROMPT
    query_len: int = 128
    response_len: int = 768
    max_seq_len: Optional[PositiveInt] = field(default=None, metadata={
        "help": "context length (default: params.json's)"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step2_reward_model.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    _, opts = parse_config(parser, RewardScoreOptions)
    require(opts, "ckpt_dir", "instruction", "response")
    principles = opts.principle
    if not principles:
        principles = [p["definition"] for p in load_principles(opts.principle_file, ("definition",))]
        principles = principles[:opts.num_principles]
    template = read_template(opts.prompt_template)
    check_reward_model(opts.ckpt_dir)  # a policy's checkpoint has no trained head: its rewards would be noise
    info = distributed.init(opts.model_parallel_size)
    rm = load_reward_model(opts.ckpt_dir, info.model_parallel_size, info.model_parallel_rank, opts.max_seq_len,
                           device=info.device, dtype=cli.resolve_dtype(opts.dtype, info.device))
    tokenizer = load_tokenizer(opts.tokenizer_path, opts.ckpt_dir)
    scorer = RewardScorer(rm, PromptBuilder(tokenizer, template, opts.query_len, opts.response_len))
    rewards = scorer.score([opts.instruction] * len(opts.response), opts.response, [principles] * len(opts.response))
    cli.log(json.dumps([{"response": r, "reward": float(x)} for r, x in zip(opts.response, rewards)]))


if __name__ == "__main__":
    cli.run(main)
