"""A command's final outputs and their record: how every command, script and driver knows what is finished.

A command that writes final files calls `claim(outputs, settings, overwrite)` before any work and `complete(...)`
after the last file is in place (each file itself written atomically). The record, `<first output>.status.json`,
holds the settings and a status: "running" from the claim, "complete" once every output is written. So:

  no outputs yet                         -> the work starts (or resumes: a job's chunks, a trainer's checkpoints)
  outputs + "running" with these settings -> this command was killed after writing them: it is finished again
  outputs + "complete", or no record      -> refused: "already exists (pass --overwrite to replace it)"
  a record with other settings           -> refused: an unfinished run made with other settings

`is_complete(outputs)` is what a driver asks of a stage whose completion it did not get to record (killed right after
the command ended): the outputs exist and their record says complete. `--overwrite` is the only way to replace a
finished output.
"""

import json
import dataclasses
import os
import sys
from typing import Sequence

from llama_mp.jsonl import write_json_atomic

RUNNING, COMPLETE = "running", "complete"


def record_path(outputs: Sequence[str]) -> str:
    return outputs[0] + ".status.json"


def read_record(outputs: Sequence[str]):
    path = record_path(outputs)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a record is written atomically; an unreadable one is not ours
    return record if isinstance(record, dict) and record.get("status") in (RUNNING, COMPLETE) else None


def normalised(settings: dict) -> dict:
    return json.loads(json.dumps(settings))  # tuples -> lists, as read back


def is_complete(outputs: Sequence[str]) -> bool:
    record = read_record(outputs)
    return bool(record) and record["status"] == COMPLETE and all(os.path.exists(p) for p in outputs)


def claim(outputs: Sequence[str], settings: dict, overwrite: bool) -> None:
    """Check the outputs before any work (see the module doc) and record this run as running."""
    settings = normalised(settings)
    record = read_record(outputs)
    existing = [p for p in outputs if os.path.exists(p)]
    if not overwrite:
        ours = record is not None and record["status"] == RUNNING
        if existing and not ours:
            raise FileExistsError(f"{existing[0]}: already exists (pass --overwrite to replace it)")
        if ours and record.get("settings") != settings:
            before = record.get("settings") or {}
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(f"{record_path(outputs)}: an unfinished run made with other settings "
                             f"({', '.join(changed)}); rerun with the same flags to resume, or pass --overwrite")
    for directory in {os.path.dirname(os.path.abspath(p)) for p in outputs}:
        os.makedirs(directory, exist_ok=True)
    write_json_atomic(record_path(outputs), {"status": RUNNING, "settings": settings,
                                             "outputs": [os.path.basename(p) for p in outputs]})


def command_settings(*options) -> dict:
    """A command's settings, from its config dataclasses (or an argparse namespace): every option but --overwrite
    (they determine its outputs)."""
    settings = {}
    for opts in options:
        settings.update(dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else vars(opts))
    settings.pop("overwrite", None)
    return settings


def complete(outputs: Sequence[str]) -> None:
    """After the last output is written: the record says complete."""
    missing = [p for p in outputs if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"{missing[0]}: not written, cannot be recorded as complete")
    record = read_record(outputs) or {}
    write_json_atomic(record_path(outputs), {**record, "status": COMPLETE})


if __name__ == "__main__":  # for shell scripts: `python -m llama_mp.outputs FILE...` exits 0 when they are complete
    sys.exit(0 if sys.argv[1:] and is_complete(sys.argv[1:]) else 1)
