"""r0_s1: cold-start prompts: write a new row of a table from in-context rows of it.

  python -m step0_coldstart.sft_generator --datasets configs/tabular/{adult,buddy,california}.yaml \
      --heldout configs/tabular/abalone.yaml --tokenizer_path data/llama2c/tok512.model --output_dir runs/tabular/r0

For each of the training data sets (A, B, C), --prompts_per_dataset rows of its training split become answers; each
prompt shows in-context rows of the same split: the most similar and the least similar to the answer row by cosine
similarity (standardised numbers, one-hot categories). For the held-out data set D, prompts (without answers) are made
the same way from D's training split only: D's test split, on which quality is measured, appears in no prompt.
The number of in-context rows is the largest k <= --num_examples (for D's prompts --heldout_examples, default the same)
for which prompt + answer fit --max_seq_len tokens with the given tokenizer; token lengths are reported. Outputs:
  <output_dir>/sft_train.jsonl      {"dataset", "prompt", "response"} for train_sft
  <output_dir>/<D>_prompts.jsonl    {"dataset", "prompt_id", "prompt", "context": the in-context rows} for round 1
  <output_dir>/lengths.json         token lengths per data set (max, mean) and k used
The options are SftGeneratorOptions': every one also a key of a --config YAML file (flags over the file;
llama_mp/config.py).
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from llama_mp import cli, outputs
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.jsonl import write_json_atomic, write_jsonl_atomic
from llama_mp.tokenizer import Tokenizer, load_tokenizer
from step0_coldstart.tabular import ANSWER_LEAD, Encoder, Schema, load_rows, load_schema, row_to_text, splits

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


@dataclass
class SftGeneratorOptions:
    """r0_s1's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    datasets: list[str] = field(default_factory=list, metadata={"help": "data set YAMLs for the SFT prompts (A, B, C)"})
    heldout: Optional[str] = field(default=None, metadata={"help": "the held-out data set YAML (D)"})
    tokenizer_path: Optional[str] = field(default=None, metadata={
        "help": "SentencePiece .model, tokenizer.json or a directory"})
    output_dir: Optional[str] = None
    splits_dir: str = "runs/tabular/splits"
    prompts_per_dataset: int = 200
    heldout_prompts: int = 50
    num_examples: PositiveInt = 5
    # more rows at sampling than in training: a generator SFT'd on prompts of 3 rows writes rows whose target follows
    # their measurements more often from 8 (SmolLM2 on abalone, step0's README)
    heldout_examples: Optional[PositiveInt] = field(default=None, metadata={
        "help": "in-context rows of the held-out prompts (default: num_examples)"})
    max_seq_len: int = 2048
    seed: int = 0


def words(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def build_prompt(schema: Schema, examples: list[dict]) -> str:
    head = (f"Here are {words(len(examples))} entries of tabular data in JSON format, each consisting of "
            f"{words(len(schema.columns))} features. The target feature {schema.target} is a {schema.task} task.\n\n")
    body = "".join(f"sample {words(i + 1)}:\n{row_to_text(row, schema)}\n\n" for i, row in enumerate(examples))
    return head + body + ("Directly generate only one new final sample in JSON format that approximates the key "
                          "patterns of the samples above.\nAnswer:\n")


def neighbours(matrix: np.ndarray, index: int, k: int) -> list[int]:
    """The ceil(k/2) most and floor(k/2) least cosine-similar rows to row `index` (itself excluded)."""
    norms = np.linalg.norm(matrix, axis=1) + 1e-12
    similarity = matrix @ matrix[index] / (norms * norms[index])
    similarity[index] = np.nan
    order = [int(i) for i in np.argsort(-np.nan_to_num(similarity, nan=-np.inf)) if int(i) != index]
    most, least = order[:(k + 1) // 2], [i for i in reversed(order) if i != index][:k // 2]
    return most + [i for i in least if i not in most]


def dataset_prompts(schema: Schema, rows: list[dict], n_prompts: int, num_examples: int, tokenizer: Tokenizer,
                    max_seq_len: int, seed: int, with_answers: bool) -> tuple[list[dict], dict]:
    matrix = Encoder(schema, rows).distance_matrix(rows)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(rows), size=min(n_prompts, len(rows)), replace=False)
    records, lengths, used_k = [], [], []
    for index in picks:
        answer = ANSWER_LEAD + row_to_text(rows[int(index)], schema)
        for k in range(num_examples, 0, -1):
            examples = [rows[i] for i in neighbours(matrix, int(index), k)]
            prompt = build_prompt(schema, examples)
            total = len(tokenizer.encode(prompt + answer, bos=True, eos=True))
            if total <= max_seq_len:
                break
        else:
            raise ValueError(f"{schema.path}: even one in-context row and the answer need {total} tokens, more than "
                             f"max_seq_len {max_seq_len}")
        lengths.append(total)
        used_k.append(k)
        record = {"dataset": schema.name, "prompt_id": f"{schema.name}-{int(index)}", "prompt": prompt}
        if with_answers:
            record["response"] = answer
        else:  # round 1 scores a sample against the real rows its prompt showed (the contrast rows)
            record["context"] = examples
        records.append(record)
    return records, {"max_tokens": max(lengths), "mean_tokens": round(float(np.mean(lengths)), 1),
                     "min_examples": min(used_k), "mean_examples": round(float(np.mean(used_k)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.sft_generator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args, opts = parse_config(parser, SftGeneratorOptions)
    require(opts, "datasets", "heldout", "tokenizer_path", "output_dir")
    tokenizer = load_tokenizer(opts.tokenizer_path)
    heldout = load_schema(opts.heldout)
    train_file = os.path.join(opts.output_dir, "sft_train.jsonl")
    prompts_file = os.path.join(opts.output_dir, f"{heldout.name}_prompts.jsonl")
    lengths_file = os.path.join(opts.output_dir, "lengths.json")
    report, sft = {}, []
    for path in opts.datasets:
        schema = load_schema(path)
        if schema.name == heldout.name:
            raise ValueError(f"{path}: the held-out data set {heldout.name!r} cannot also be an SFT data set")
        rows = load_rows(schema)
        train = [rows[i] for i in splits(schema, len(rows), opts.splits_dir)["train"]]
        records, report[schema.name] = dataset_prompts(schema, train, opts.prompts_per_dataset, opts.num_examples,
                                                       tokenizer, opts.max_seq_len, opts.seed, with_answers=True)
        sft.extend(records)
    rows = load_rows(heldout)
    train = [rows[i] for i in splits(heldout, len(rows), opts.splits_dir)["train"]]  # never the test split
    held_k = opts.num_examples if opts.heldout_examples is None else opts.heldout_examples
    held_records, report[heldout.name] = dataset_prompts(heldout, train, opts.heldout_prompts, held_k, tokenizer,
                                                         opts.max_seq_len, opts.seed, with_answers=False)
    outputs.claim([train_file, prompts_file, lengths_file], outputs.command_settings(opts), args.overwrite)
    write_jsonl_atomic(train_file, sft)
    write_jsonl_atomic(prompts_file, held_records)
    write_json_atomic(lengths_file, report)
    outputs.complete([train_file, prompts_file, lengths_file])
    print(f"wrote {len(sft)} SFT examples to {train_file} and {len(held_records)} {heldout.name} prompts to "
          f"{prompts_file}; token lengths: {json.dumps(report)}")


if __name__ == "__main__":
    cli.run(main)
