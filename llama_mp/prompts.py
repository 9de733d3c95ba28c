"""Prompt records, as every step reads them: {"id", "instruction", "input", ...} from a JSON list or JSONL file.

One loader (SALMON's responses, PPO's rollouts) and one id: the same instruction and input get the same id in any
file, order or export, so records of different steps join on it.
"""

import hashlib

from llama_mp.jsonl import read_records


def prompt_id(instruction: str, input_text: str = "") -> str:
    return hashlib.sha1(f"{instruction}\x00{input_text}".encode()).hexdigest()[:16]


def load_prompts(path: str) -> list[dict]:
    """The records with "instruction" checked (a non-empty string), "input" defaulting to "", "id" added where
    missing; exact duplicates (same id) are kept once. An empty file is an error naming it."""
    prompts, seen = [], set()
    for position, record in read_records(path):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{path}:{position}: record has no \"instruction\" string")
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise ValueError(f"{path}:{position}: \"input\" must be a string")
        pid = record.get("id") or prompt_id(instruction, input_text)
        if pid in seen:
            continue
        seen.add(pid)
        prompts.append({**record, "id": pid, "instruction": instruction, "input": input_text})
    if not prompts:
        raise ValueError(f"{path}: no prompt records")
    return prompts


def prompt_keys(records) -> set:
    """What names the records' prompts across files whose ids follow different schemes (OASST1 message ids, prompt_id
    hashes): each one's id and its instruction text (shares_prompt matches either)."""
    return {("id", r["id"]) for r in records if r.get("id")} | {("text", r["instruction"].strip()) for r in records}


def shares_prompt(record: dict, keys: set) -> bool:
    """Whether the record's prompt is among prompt_keys' prompts, by id or by instruction."""
    return ("id", record.get("id")) in keys or ("text", record["instruction"].strip()) in keys
