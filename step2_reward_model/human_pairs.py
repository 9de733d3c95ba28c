"""Human preference pairs from OASST1's ranked sibling answers: what the reward model's human check and step 1's
judge-agreement report both read; and the split's first user turns, step 3's held-out prompts (data/oasst1/oasst1_en_validation_messages.jsonl: 355 best-vs-lower pairs, 186
best-vs-worst, over 186 first-turn prompts with at least two ranked answers). Those evaluations read the file from
its first prompt on; preference-model pre-training (PMP, SALMON's first reward-model stage) takes its pairs from the
prompts after the first --skip_prompts:

  python -m step2_reward_model.human_pairs --output_file runs/pmp_pairs.json [--skip_prompts 80] [--max_pairs 64]

writes {id (the prompt's message id), instruction, input, output_1, output_2, preference} records (the reward-model
trainer's format; the human's better answer at a seeded position), one per prompt: its best answer against its worst.

Each pair: {"id": the prompt's message id, "instruction": the prompt, "chosen": the best-ranked answer (rank 0),
"rejected": a lower-ranked sibling, "rejected_rank", "principles", "margin": 0.0}. Deleted messages are left out.
"""

import argparse
import os
import random
from dataclasses import dataclass, field
from typing import Optional

from llama_mp import cli, outputs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_json_atomic
from step2_reward_model.reward_model import DATA

MESSAGES = os.path.join(DATA, "oasst1/oasst1_en_validation_messages.jsonl")

AGAINST = ("all", "worst")


def read_messages(messages_file: str) -> tuple[dict[str, str], dict[str, list[tuple[int, str]]]]:
    """(first user turns: message id -> text, in the file's order; ranked answers: parent id -> [(rank, text)]), deleted
    messages left out. A malformed message is an error naming its line."""
    prompts, answers = {}, {}
    for line, m in iter_jsonl(messages_file):
        if m.get("deleted"):
            continue
        if not isinstance(m.get("message_id"), str) or not isinstance(m.get("text"), str):
            raise ValueError(f"{messages_file}:{line}: an OASST1 message needs \"message_id\" and \"text\" strings")
        rank = m.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise ValueError(f"{messages_file}:{line}: \"rank\" must be an integer or null, got {rank!r}")
        if m.get("role") == "prompter" and m.get("parent_id") is None:
            prompts[m["message_id"]] = m["text"]
        elif m.get("role") == "assistant" and rank is not None:
            answers.setdefault(m["parent_id"], []).append((rank, m["text"]))
    return prompts, answers


def human_pairs(prompts: dict[str, str], answers: dict, principles: list[str], against: str = "all") -> list[dict]:
    """For each first-turn prompt (read_messages), its best-ranked answer against each lower-ranked sibling (`all`) or
    against the lowest-ranked one only (`worst`). In the file's order of prompts."""
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    pairs = []
    for pid, text in prompts.items():
        ranked = sorted(answers.get(pid, []))
        for rank, worse in ranked[1:] if against == "all" else ranked[-1:] if len(ranked) > 1 else []:
            pairs.append({"id": pid, "instruction": text, "chosen": ranked[0][1], "rejected": worse,
                          "rejected_rank": rank, "principles": principles, "margin": 0.0})
    return pairs


def oasst_human_pairs(messages_file: str, principles: list[str], against: str = "all") -> list[dict]:
    """human_pairs of the file."""
    return human_pairs(*read_messages(messages_file), principles, against)


def first_turn_prompts(messages_file: str) -> list[tuple[str, str]]:
    """(message id, text) of every first user turn (a prompter message without parent), in the file's order."""
    return list(read_messages(messages_file)[0].items())


def pmp_pairs(messages_file: str, skip_prompts: int, max_pairs: int, seed: int = 0) -> list[dict]:
    """Best-vs-worst pairs of the first-turn prompts after the file's first `skip_prompts` (whatever their answers),
    at most `max_pairs` (0: all), as reward-model training records; output_1 is the human's better answer or its worse
    one by a seeded coin per pair, so that a position carries no label."""
    prompts, answers = read_messages(messages_file)
    skipped = set(list(prompts)[:skip_prompts])
    pairs = [p for p in human_pairs(prompts, answers, [], "worst") if p["id"] not in skipped]
    rng = random.Random(seed)
    records = []
    for p in pairs[:max_pairs] if max_pairs > 0 else pairs:
        first = rng.random() < 0.5
        records.append({"id": p["id"], "instruction": p["instruction"], "input": "",
                        "output_1": p["chosen"] if first else p["rejected"],
                        "output_2": p["rejected"] if first else p["chosen"], "preference": 1 if first else 2})
    return records


@dataclass
class PMPOptions:
    messages_file: str = field(default=MESSAGES, metadata={"help": "OASST1 messages (JSONL, one message per line)"})
    output_file: Optional[str] = field(default=None, metadata={"help": "the pairs' JSON list"})
    skip_prompts: int = field(default=80, metadata={
        "help": "the file's first first-turn prompts, left to the evaluations, which read the first ones"})
    max_pairs: int = field(default=0, metadata={"help": "at most this many pairs (0: every one)"})
    seed: int = field(default=0, metadata={"help": "of the answers' positions"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step2_reward_model.human_pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file")
    args, opts = parse_config(parser, PMPOptions)
    require(opts, "output_file")
    if opts.skip_prompts < 0 or opts.max_pairs < 0:
        raise ValueError(f"--skip_prompts and --max_pairs must be >= 0, got {opts.skip_prompts} and {opts.max_pairs}")
    records = pmp_pairs(opts.messages_file, opts.skip_prompts, opts.max_pairs, opts.seed)
    if not records:
        raise ValueError(f"{opts.messages_file}: no ranked pair after its first {opts.skip_prompts} prompts")
    outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    write_json_atomic(opts.output_file, records)
    outputs.complete([opts.output_file])
    print(f"wrote {len(records)} human pairs (prompts after the first {opts.skip_prompts}) to {opts.output_file}",
          flush=True)


if __name__ == "__main__":
    cli.run(main)
