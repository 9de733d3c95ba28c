"""JSON Lines files: reading with errors that name the file and line, appending as work finishes, atomic writes."""

import json
import os
from typing import Iterable


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSONL file; a torn last line (a crash mid-append) is an error only if it is not the last."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the writer died mid-line; that record never finished
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk, so a kill loses at most the record being written."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
