"""r1_s5: scored samples -> preference pairs for DPO (the reference's rules).

  python -m step0_coldstart.convert_score_to_prefer --score_file runs/tabular/r1/abalone.score.jsonl \
      --output_file runs/tabular/r1/abalone.pref.jsonl [--max_pairs 1000] [--seed 42]

Input records (r1_s4): {"syn_pmt_id", "prompt", "answer", "status", "gain_score", "status_score"}. Samples are grouped by
prompt; groups without any SUCCESS sample are dropped; every pair within a group is compared: when both parsed
(SUCCESS) the higher gain_score wins, otherwise the higher status_score wins; a missing gain counts as 0; pairs whose
gain + status are equal are skipped (a tie teaches nothing). --max_pairs keeps a seeded random subset. Output JSONL, the
format step3_rl.train_dpo reads: {"prompt": [user message], "chosen": [assistant], "rejected": [assistant],
"chosen_score", "rejected_score", "syn_pmt_id"}. The options are PreferOptions': every one also a key of a --config YAML
file (flags over the file; llama_mp/config.py).
"""

import argparse
import random
from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

from llama_mp import cli, outputs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_jsonl_atomic
from step0_coldstart.tabular import STATUS_SCORE, SUCCESS


@dataclass
class PreferOptions:
    """r1_s5's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    score_file: Optional[str] = field(default=None, metadata={"help": "r1_s4's <name>.score.jsonl"})
    output_file: Optional[str] = field(default=None, metadata={"help": "JSONL of preference pairs (train_dpo's input)"})
    max_pairs: int = field(default=0, metadata={"help": "keep a seeded random subset of this many pairs (0: all)"})
    seed: int = field(default=42, metadata={"help": "of the max_pairs subset"})


def preference_pairs(records: list[dict], max_pairs: int = 0, seed: int = 42) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r["syn_pmt_id"]), []).append(r)
    pairs = []
    for pmt_id in sorted(groups):
        group = groups[pmt_id]
        if not any(r["status"] == SUCCESS for r in group):
            continue
        for a, b in combinations(group, 2):
            gain_a, gain_b = float(a.get("gain_score") or 0.0), float(b.get("gain_score") or 0.0)
            status_a = float(a.get("status_score", STATUS_SCORE.get(a["status"], 0)))
            status_b = float(b.get("status_score", STATUS_SCORE.get(b["status"], 0)))
            if gain_a + status_a == gain_b + status_b:
                continue
            if a["status"] == SUCCESS and b["status"] == SUCCESS:
                a_wins = gain_a > gain_b
            else:
                a_wins = status_a > status_b if status_a != status_b else gain_a > gain_b
            chosen, rejected = (a, b) if a_wins else (b, a)
            pairs.append({"prompt": [{"role": "user", "content": chosen["prompt"]}],
                          "chosen": [{"role": "assistant", "content": chosen["answer"]}],
                          "rejected": [{"role": "assistant", "content": rejected["answer"]}],
                          "chosen_score": (gain_a + status_a) if a_wins else (gain_b + status_b),
                          "rejected_score": (gain_b + status_b) if a_wins else (gain_a + status_a),
                          "syn_pmt_id": pmt_id})
    if max_pairs and len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    return pairs


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sample(r: dict) -> str:
    """What is wrong with a scored sample's fields ("" when nothing): checked before any output is claimed."""
    for key in ("prompt", "answer"):
        if not isinstance(r[key], str):
            return f"{key!r} must be a string, got {r[key]!r}"
    if not isinstance(r["status"], str) or r["status"] not in STATUS_SCORE:
        return f"'status' must be one of {sorted(STATUS_SCORE)}, got {r['status']!r}"
    if r.get("gain_score") is not None and not is_number(r["gain_score"]):
        return f"'gain_score' must be a number or null, got {r['gain_score']!r}"
    if "status_score" in r and not is_number(r["status_score"]):
        return f"'status_score' must be a number, got {r['status_score']!r}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.convert_score_to_prefer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file")
    args, opts = parse_config(parser, PreferOptions)
    require(opts, "score_file", "output_file")
    records = []
    for line, r in iter_jsonl(opts.score_file):
        missing = [k for k in ("syn_pmt_id", "prompt", "answer", "status") if k not in r]
        if missing:
            raise ValueError(f"{opts.score_file}:{line}: scored sample has no {missing[0]!r}")
        bad = check_sample(r)
        if bad:
            raise ValueError(f"{opts.score_file}:{line}: {bad}")
        records.append(r)
    outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    pairs = preference_pairs(records, opts.max_pairs, opts.seed)
    write_jsonl_atomic(opts.output_file, pairs)
    outputs.complete([opts.output_file])
    print(f"wrote {len(pairs)} preference pairs from {len(records)} samples to {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
