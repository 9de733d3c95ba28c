"""How good is the self-judge? Its judgments of OASST1 answer pairs that humans ranked, before any training on them.

  python -m step1_synthetic_preference.judge_agreement --ckpt_dir D [--tokenizer_path T] \
      --pairs_file data/oasst1/oasst1_en_validation_messages.jsonl --output_file runs/step1/judge_agreement.json

The pairs: each first-turn prompt's best-ranked answer against its worst-ranked one (--against worst, 186 pairs; `all`:
against every lower-ranked one, the reward model's 355 human pairs; step2_reward_model/human_pairs.py), the human's
choice as output 1. They are judged by step 1's own code (llama_mp.judge.judge_chunk: every principle, both orders,
the same prompt, chat format, truncation and a/b logits), the judgments kept in --judgments_file (resumable and
sharded like synthetic_preference; a complete one made with the same settings is reused). Reported per principle and
over all (pair, principle) judgments:
  agreement          share of pairs where the judge, both orders together (r12 + r21 > 0: output 1), prefers the
                     human's choice; a tie (r12 + r21 == 0, e.g. a judge that always answers "a") counts one half;
  both_orders_agree  share of pairs where both orders prefer the same output (prompt_preference 1 or 2: the pairs
                     SALMON keeps); agreement_when_consistent is the agreement among them (None if there are none);
  length_baseline    on the same pairs: the share where the longer answer (in characters, before the judge's
                     truncation) is the human's choice; equal lengths count one half.
Judge prompts longer than --max_seq_len are skipped and counted. Writes JSON {"pairs", "against", "overall",
"principles": {dimension: {...}}} and prints a table.
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli, jobs, outputs
from llama_mp.chat import chat_format, load_principles
from llama_mp.config import parse_config, require
from llama_mp.jsonl import read_jsonl, write_json_atomic
from llama_mp.judge import DEFAULT_JUDGE_PRINCIPLES, DEFAULT_JUDGE_PROMPT, answer_token_ids, half_credit, judge_chunk
from llama_mp.jsonl import read_text
from step2_reward_model.human_pairs import MESSAGES, oasst_human_pairs

DEFAULT_PAIRS = MESSAGES


@dataclass
class JudgeAgreementOptions(cli.ModelOptions):
    pairs_file: str = field(default=DEFAULT_PAIRS, metadata={"help": "OASST1 messages with ranked answers"})
    against: Literal["all", "worst"] = field(default="worst", metadata={
        "help": "worst: each prompt's best-ranked answer against its worst-ranked one; all: against every lower one"})
    max_pairs: int = field(default=0, metadata={"help": "the first N pairs only (0: all)"})
    principle_file: str = DEFAULT_JUDGE_PRINCIPLES
    prompt_template: str = DEFAULT_JUDGE_PROMPT
    chat_format: Literal["auto", "dromedary", "template"] = "auto"
    output_file: Optional[str] = field(default=None, metadata={"help": "the report (JSON)"})
    judgments_file: Optional[str] = field(default=None, metadata={"help": "default: <output_file>.judgments.jsonl"})
    max_instruction_tokens: int = 256
    max_response_tokens: int = 640
    pairs_per_chunk: int = 4
    no_prefix_reuse: bool = field(default=False, metadata={"help": "recompute every judge prompt in full"})
    seed: int = field(default=1, metadata={"help": "torch's seed (the judging samples nothing)"})


def judge_pairs(human: list[dict]) -> list[dict]:
    """Human pairs as synthetic_preference's pairs: the human's choice is output 1."""
    return [{"id": f"{h['id']}-{h['rejected_rank']}", "example_idx": i, "instruction": h["instruction"], "input": "",
             "output_1": h["chosen"], "output_2": h["rejected"]} for i, h in enumerate(human)]


def figures(rows: list[tuple[dict, dict]]) -> dict:
    """(pair, judgment) rows -> the figures of the module doc."""
    judged = [(p, r) for p, r in rows if r.get("relative_score") is not None]
    if not judged:
        return {"judged": 0, "skipped": len(rows), "agreement": None, "both_orders_agree": None,
                "agreement_when_consistent": None, "length_baseline": None}
    consistent = [r for _, r in judged if r["prompt_preference"] in (1, 2)]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"judged": len(judged), "skipped": len(rows) - len(judged),
            "agreement": mean([half_credit(sum(r["relative_score"])) for _, r in judged]),
            "both_orders_agree": mean([1.0] * len(consistent) + [0.0] * (len(judged) - len(consistent))),
            "agreement_when_consistent": mean([float(r["prompt_preference"] == 1) for r in consistent]),
            "length_baseline": mean([half_credit(len(p["output_1"]) - len(p["output_2"])) for p, _ in judged])}


def agreement_report(pairs: list[dict], records: list[dict], principles: list[dict], against: str) -> dict:
    by_id = {p["id"]: p for p in pairs}
    rows = [(by_id[r["id"]], r) for r in records]
    return {"pairs": len(pairs), "against": against, "overall": figures(rows),
            "principles": {p["dimension"]: figures([(q, r) for q, r in rows if r["principle_index"] == i])
                           for i, p in enumerate(principles)}}


def table(report: dict) -> str:
    keys = ("judged", "agreement", "both_orders_agree", "agreement_when_consistent", "length_baseline")
    lines = ["| principle | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, f in [*report["principles"].items(), ("overall", report["overall"])]:
        lines.append(f"| {name} | " + " | ".join(str(f[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.judge_agreement",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true",
                        help="judge again (discard the judgments_file or an unfinished run)")
    args, opts = parse_config(parser, JudgeAgreementOptions)
    require(opts, "ckpt_dir", "output_file")
    pairs = judge_pairs(oasst_human_pairs(opts.pairs_file, [], opts.against))
    pairs = pairs[:opts.max_pairs] if opts.max_pairs > 0 else pairs
    if not pairs:
        raise ValueError(f"{opts.pairs_file}: no prompt with two ranked answers")
    principles = load_principles(opts.principle_file)
    template = read_text(opts.prompt_template)
    judgments_file = opts.judgments_file or os.path.splitext(opts.output_file)[0] + ".judgments.jsonl"
    settings = {k: v for k, v in outputs.command_settings(opts).items() if k not in ("output_file", "judgments_file")}
    record = outputs.read_record([judgments_file])
    if (not args.overwrite and outputs.is_complete([judgments_file])
            and record.get("settings") == outputs.normalised(settings)):
        print(f"[judge_agreement] reusing the complete {judgments_file}", flush=True)
        records = read_jsonl(judgments_file)
    else:
        info, sampler = cli.build(opts, opts.seed)
        chat = chat_format(sampler.tokenizer, opts.chat_format)
        id_a, id_b = answer_token_ids(sampler.tokenizer)
        jobs.prepare(judgments_file, settings, args.overwrite, info)

        def process(chunk: list[dict]) -> list[dict]:
            return judge_chunk(sampler, chat, chunk, principles, template, id_a, id_b, opts.max_instruction_tokens,
                               opts.max_response_tokens, prefix_reuse=not opts.no_prefix_reuse)

        jobs.run(judgments_file, pairs, lambda p: p["id"], opts.pairs_per_chunk, process, info, "judge")
        records = jobs.merge(judgments_file, lambda r: (r["id"], r["principle_index"]), info)
        if not info.is_main:
            return
    report = agreement_report(pairs, records, principles, opts.against)
    write_json_atomic(opts.output_file, report)
    print(table(report))
    print(f"{len(pairs)} pairs ({opts.against}) -> {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
