"""What the step-1 commands share: paths and response pairs (prompt records: llama_mp/prompts.py; the judge:
llama_mp/judge.py)."""

import glob
import os
from typing import Optional

from llama_mp.jsonl import iter_jsonl

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_PROMPTS = os.path.join(DATA, "oasst1/oasst1_prompts.json")


def clean_response(text) -> str:
    """The reference's pairing clean-up: cut at the first "###" and strip."""
    if not isinstance(text, str):
        return ""
    return text.split("###", 1)[0].strip()


def response_files(files: Optional[list[str]], pattern: Optional[str]) -> list[str]:
    """The two response files: given explicitly (response_files), or a glob that must match exactly two (taken in
    sorted order; response_pattern); one of the two options, not both."""
    if bool(files) == bool(pattern):
        raise ValueError("give either --response_files (two files) or --response_pattern")
    if files and len(files) != 2:
        raise ValueError(f"--response_files takes two files (RESPONSES_1 RESPONSES_2), got {len(files)}")
    files = files or sorted(glob.glob(pattern))
    if len(files) != 2:
        raise ValueError(f"--response_pattern {pattern!r} matches {len(files)} files, not 2")
    return files


def load_pairs(files: list[str], min_chars: int) -> tuple[list[dict], int]:
    """Pairs joined by prompt id; (pairs in id order, number dropped for empty/short responses)."""
    by_file = []
    for path in files:
        records = {}
        for line, record in iter_jsonl(path):
            for key in ("id", "instruction"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{line}: response record has no {key!r} string")
            if record["id"] in records:
                raise ValueError(f"{path}:{line}: prompt id {record['id']} appears twice")
            records[record["id"]] = (line, record)
        by_file.append(records)
    first, second = by_file
    for (path, records), other_path, other in [((files[0], first), files[1], second),
                                               ((files[1], second), files[0], first)]:
        for pid, (line, _) in records.items():
            if pid not in other:
                raise ValueError(f"{path}:{line}: prompt id {pid} has no response in {other_path}")
    pairs, dropped = [], 0
    for pid in sorted(first):
        record = first[pid][1]
        out1, out2 = clean_response(record.get("output")), clean_response(second[pid][1].get("output"))
        if len(out1) < min_chars or len(out2) < min_chars:
            dropped += 1
            continue
        pairs.append({"id": pid, "instruction": record["instruction"], "input": record.get("input") or "",
                      "output_1": out1, "output_2": out2})
    for index, pair in enumerate(pairs):
        pair["example_idx"] = index
    return pairs, dropped
