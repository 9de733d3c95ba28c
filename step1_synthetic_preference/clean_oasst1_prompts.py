"""Build the prompt set from OASST1 message trees: the first user turn of every tree with at least two messages.

  python -m step1_synthetic_preference.clean_oasst1_prompts --output_file runs/step1/oasst1_prompts.json \
      [--messages_file data/oasst1/oasst1_en_validation_messages.jsonl] [--overwrite]

Reads any export in the OASST1 message schema (one message per JSONL line with message_id, parent_id, text, role,
message_tree_id). Deleted messages are ignored. Writes a JSON list of {"id", "instruction", "input": "", "output": ""},
deduplicated by instruction, in the order the trees' roots appear. (The shipped data/oasst1/oasst1_prompts.json, 9,846
prompts from the OASST1 train split, is the default prompt set of the later commands.)
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional

from llama_mp import cli, outputs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_json_atomic
from llama_mp.prompts import prompt_id
from step1_synthetic_preference.common import DATA

REQUIRED = ("message_id", "parent_id", "text", "role", "message_tree_id")


@dataclass
class CleanOptions:
    messages_file: str = field(default=os.path.join(DATA, "oasst1/oasst1_en_validation_messages.jsonl"), metadata={
        "help": "OASST1 messages (JSONL, one message per line)"})
    output_file: Optional[str] = field(default=None, metadata={"help": "the prompts' JSON list"})


def oasst1_prompts(messages_file: str) -> list[dict]:
    roots, tree_sizes = [], {}
    for line, message in iter_jsonl(messages_file):
        missing = [k for k in REQUIRED if k not in message]
        if missing:
            raise ValueError(f"{messages_file}:{line}: message has no {missing[0]!r} field")
        if message.get("deleted"):
            continue
        wrong = [k for k in ("text", "role") if not isinstance(message[k], str)]
        if wrong:
            raise ValueError(f"{messages_file}:{line}: {wrong[0]!r} must be a string, got {message[wrong[0]]!r}")
        tree = message["message_tree_id"]
        tree_sizes[tree] = tree_sizes.get(tree, 0) + 1
        if message["parent_id"] is None and message["role"] == "prompter":
            roots.append(message)
    prompts, seen = [], set()
    for root in roots:
        instruction = root["text"].strip()
        if tree_sizes[root["message_tree_id"]] < 2 or not instruction or instruction in seen:
            continue
        seen.add(instruction)
        prompts.append({"id": prompt_id(instruction), "instruction": instruction, "input": "", "output": ""})
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.clean_oasst1_prompts",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file")
    args, opts = parse_config(parser, CleanOptions)
    require(opts, "output_file")
    prompts = oasst1_prompts(opts.messages_file)
    outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    write_json_atomic(opts.output_file, prompts)
    outputs.complete([opts.output_file])
    print(f"wrote {len(prompts)} prompts to {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
