"""Turn per-principle self-judgments into principle-conditioned preference data for the reward model (and DPO).

  python -m step1_synthetic_preference.aggregate_synthetic_preference \
      --response_pattern "runs/step1/oasst1_response*.jsonl" --preference_file runs/step1/oasst1_preference.jsonl \
      --output_file runs/step1/synthetic_preference.json [--pairs_file runs/step1/synthetic_preference_pairs.jsonl]

The reference algorithm, seeded and deterministic. Per dimension d, var_d = variance of all its r12 and r21. Then
--num_passes times over every pair that has all --dimensions (in prompt-id order):
  1. shuffle the dimensions; draw k ~ Geometric(--geometric_p), redrawn while k > number of dimensions; keep k;
  2. score_d = mean(r12, r21) / var_d when r12 and r21 agree in sign, else 0;
  3. negate each kept dimension with probability --negation_p (its negative definition is shown; its score flips);
  4. the dimension with the largest |score| decides: preference 1 (output_1) if > 0, 2 if < 0; none if 0;
  5. symbolic rules: if exactly one output contains "As an AI language model", the other is preferred with
     probability --ai_rule_p; if exactly one output is written in a different script from the instruction it loses,
     and if both are the pair is dropped (--no_language_rule turns this off);
  6. label noise: flip with probability --label_noise (--rule_label_noise for rule-decided items);
  7. swap output_1/output_2 (and the label) with probability --swap_p.
Output: a JSON list with the reference's fields (doinate_dimension_idx [sic], dimensions, dimension_scores =
{dimension: [r12, r21]}, negative_definitions, instruction, input, output_1, output_2, preference, flip, lang,
rule_flag; scores seen from the outputs as finally ordered) plus "id", "pass", "normalized_scores" (the kept
dimensions' signed scores) and "principles" (the definitions shown, negative where negated); and the same pairs as
prompt/chosen/rejected JSONL
(message lists, the format OpenRLHF and TRL read) for the DPO trainer.
"""

import argparse
import ast
import os
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from llama_mp import cli, outputs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_json_atomic, write_jsonl_atomic
from llama_mp.chat import load_principles
from llama_mp.judge import DEFAULT_JUDGE_PRINCIPLES, instruction_text
from step1_synthetic_preference.common import load_pairs, response_files

DEFAULT_DIMENSIONS = ["Concise", "Honest and Accurate", "Ethical", "Specific", "Educational and Engaging",
                      "Methodical", "Creative", "Comprehensive"]
AI_PHRASE = "As an AI language model"


@dataclass
class AggregateOptions:
    response_files: list[str] = field(default_factory=list, metadata={
        "help": "the two response files, RESPONSES_1 RESPONSES_2 (output_1's, output_2's); or response_pattern"})
    response_pattern: Optional[str] = field(default=None, metadata={
        "help": "a glob matching exactly two response files (sorted)"})
    preference_file: Optional[str] = field(default=None, metadata={"help": "synthetic_preference output (JSONL)"})
    principle_file: str = DEFAULT_JUDGE_PRINCIPLES
    output_file: Optional[str] = field(default=None, metadata={"help": "JSON list for the reward model"})
    pairs_file: Optional[str] = field(default=None, metadata={
        "help": "prompt/chosen/rejected JSONL (default: beside output)"})
    dimensions: list[str] = field(default_factory=lambda: list(DEFAULT_DIMENSIONS))
    min_response_chars: int = 16
    num_passes: int = 4
    geometric_p: float = 0.2
    negation_p: float = 0.5
    ai_rule_p: float = 0.5
    no_language_rule: bool = field(default=False, metadata={"help": "no script rule (step 5 above)"})
    label_noise: float = 0.1
    rule_label_noise: float = 0.25
    swap_p: float = 0.5
    seed: int = 42

    @property
    def language_rule(self) -> bool:
        return not self.no_language_rule


def script_of(text: str) -> str:
    """The writing system most of the letters belong to (LATIN, CYRILLIC, CJK, ARABIC, ...), or "unknown"."""
    counts = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            word = name.split(" ")[0] if name else "OTHER"
            counts["CJK" if word in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else word] += 1
    return counts.most_common(1)[0][0] if counts else "unknown"


def load_judgments(path: str, dimensions: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{prompt id: {dimension: (r12, r21)}} for the wanted dimensions; skipped judgments are left out."""
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    for line, record in iter_jsonl(path):
        for key in ("id", "dimension"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{path}:{line}: judgment has no {key!r} string")
        score = record.get("relative_score")
        if record.get("skipped") or record["dimension"] not in dimensions:
            continue
        if not (isinstance(score, list) and len(score) == 2 and all(isinstance(x, (int, float)) for x in score)):
            raise ValueError(f"{path}:{line}: \"relative_score\" must be [r12, r21]")
        scores.setdefault(record["id"], {})[record["dimension"]] = (float(score[0]), float(score[1]))
    return scores


def aggregate(pairs: list[dict], judgments: dict, principles: dict[str, dict], dimensions: list[str],
              opts: AggregateOptions) -> tuple[list[dict], Counter]:
    """The records of the module doc; `opts` is AggregateOptions or anything with its attributes (language_rule
    included)."""
    rng = random.Random(opts.seed)
    stats = Counter()
    complete = [p for p in pairs if all(d in judgments.get(p["id"], {}) for d in dimensions)]
    stats["dropped: missing a dimension"] = len(pairs) - len(complete)
    var = {d: float(np.var([x for p in complete for x in judgments[p["id"]][d]])) if complete else 1.0
           for d in dimensions}
    records = []
    for pass_index in range(opts.num_passes):
        for pair in complete:
            dims = dimensions[:]
            rng.shuffle(dims)
            k = _geometric(rng, opts.geometric_p)
            while k > len(dims):
                k = _geometric(rng, opts.geometric_p)
            kept = dims[:k]
            scores = []
            for d in kept:
                r12, r21 = judgments[pair["id"]][d]
                agree = (r12 > 0 and r21 > 0) or (r12 < 0 and r21 < 0)
                scores.append((r12 + r21) / 2 / var[d] if agree and var[d] > 0 else 0.0)
            negated = [int(rng.random() < opts.negation_p) for _ in kept]
            scores = [(-s if n else s) + 0.0 for s, n in zip(scores, negated)]  # + 0.0: no "-0.0"
            dominant = max(range(k), key=lambda i: abs(scores[i]))
            if scores[dominant] == 0:
                stats["skipped: no decisive dimension"] += 1
                continue
            preference = 1 if scores[dominant] > 0 else 2
            out1, out2 = pair["output_1"], pair["output_2"]
            rule_flag = False
            if (AI_PHRASE in out1) != (AI_PHRASE in out2) and rng.random() < opts.ai_rule_p:
                preference, rule_flag = (2 if AI_PHRASE in out1 else 1), True
            lang = script_of(instruction_text(pair))
            if opts.language_rule and lang != "unknown":
                off1, off2 = script_of(out1) != lang, script_of(out2) != lang
                if off1 and off2:
                    stats["dropped: both outputs in another script"] += 1
                    continue
                if off1 != off2:
                    preference, rule_flag = (2 if off1 else 1), True
            flip = rng.random() < (opts.rule_label_noise if rule_flag else opts.label_noise)
            if flip:
                preference = 3 - preference
            raw = {d: list(judgments[pair["id"]][d]) for d in dimensions}
            if rng.random() < opts.swap_p:  # from the swapped outputs' side: [r12, r21] -> [-r21, -r12]
                out1, out2, preference = out2, out1, 3 - preference
                raw = {d: [-r21, -r12] for d, (r12, r21) in raw.items()}
                scores = [-x + 0.0 for x in scores]
            shown = [principles[d]["negative_definition"] if n else principles[d]["definition"]
                     for d, n in zip(kept, negated)]
            records.append({"id": pair["id"], "pass": pass_index, "doinate_dimension_idx": dominant,
                            "dimensions": str(tuple(kept)), "dimension_scores": raw, "normalized_scores": scores,
                            "negative_definitions": str(tuple(negated)), "principles": shown,
                            "instruction": pair["instruction"], "input": pair["input"], "output_1": out1,
                            "output_2": out2, "preference": preference, "flip": flip, "lang": lang,
                            "rule_flag": rule_flag})
    stats["records"] = len(records)
    return records, stats


def _geometric(rng: random.Random, p: float) -> int:
    """Number of Bernoulli(p) trials up to and including the first success (support 1, 2, ...)."""
    k = 1
    while rng.random() >= p:
        k += 1
    return k


def as_chosen_rejected(record: dict) -> dict:
    chosen, rejected = ((record["output_1"], record["output_2"]) if record["preference"] == 1
                        else (record["output_2"], record["output_1"]))
    return {"prompt": [{"role": "user", "content": instruction_text(record)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "margin": 0.0, "id": record["id"], "principles": record["principles"],
            "dimension": ast.literal_eval(record["dimensions"])[record["doinate_dimension_idx"]]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step1_synthetic_preference.aggregate_synthetic_preference",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output_file and pairs_file")
    args, opts = parse_config(parser, AggregateOptions)
    require(opts, "preference_file", "output_file", "dimensions")
    files = response_files(opts.response_files, opts.response_pattern)
    pairs_file = opts.pairs_file or os.path.splitext(opts.output_file)[0] + "_pairs.jsonl"
    principles = {p["dimension"]: p for p in load_principles(opts.principle_file,
                                                             ("dimension", "definition", "negative_definition"))}
    unknown = [d for d in opts.dimensions if d not in principles]
    if unknown:
        raise ValueError(f"{opts.principle_file}: has no principle named {unknown[0]!r}")
    pairs, _ = load_pairs(files, opts.min_response_chars)
    judgments = load_judgments(opts.preference_file, opts.dimensions)
    unjudged = sorted(set(judgments) - {p["id"] for p in pairs})
    if unjudged:
        raise ValueError(f"{opts.preference_file}: judgments for prompt id {unjudged[0]} that is not a pair of the "
                         f"response files")
    outputs.claim([opts.output_file, pairs_file], outputs.command_settings(opts), args.overwrite)
    records, stats = aggregate(pairs, judgments, principles, opts.dimensions, opts)
    write_jsonl_atomic(pairs_file, [as_chosen_rejected(r) for r in records])
    write_json_atomic(opts.output_file, records)
    outputs.complete([opts.output_file, pairs_file])
    print(f"wrote {len(records)} records from {len(pairs)} pairs to {opts.output_file} and {pairs_file} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(stats.items()) if k != 'records' and v)})", flush=True)


if __name__ == "__main__":
    cli.run(main)
