"""A trainer's output directory: checkpoint-N/ subdirectories and the `latest` pointer to the newest complete one.

Part of the checkpoint layout (llama_mp/checkpoint.py re-exports it), kept apart because it needs no torch: drivers
(scripts/quickstart.py, step0_coldstart.rounds) and shell scripts ask it without paying torch's start-up.

  python -m llama_mp.output_dir latest OUTPUT_DIR    prints OUTPUT_DIR/checkpoint-N (exit 1: none yet)
"""

import os
import sys
from typing import Optional

from llama_mp.jsonl import write_text_atomic

LATEST = "latest"  # <output_dir>/latest names the newest complete checkpoint-N (written after it is renamed in place)


# what a checkpoint directory holds: params.json (Meta-layout weights) or adapter_config.json (LoRA adapters on a base,
# llama_mp/lora.py)
CHECKPOINT_FILES = ("params.json", "adapter_config.json")


class CheckpointError(ValueError):
    """A checkpoint's problem, in one sentence naming the file."""


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """<output_dir>/checkpoint-N named by <output_dir>/latest, or None when the directory holds no checkpoint yet."""
    pointer = os.path.join(output_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if not name or not os.path.isdir(path):
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint directory beside it")
    return path


def write_latest(output_dir: str, checkpoint_dir: str) -> None:
    write_text_atomic(os.path.join(output_dir, LATEST), os.path.basename(checkpoint_dir) + "\n")


def resume_args(output_dir: str) -> list[str]:
    """["--resume"] when <output_dir>/latest names a checkpoint: how a driver reruns a killed training command."""
    return ["--resume"] if os.path.exists(os.path.join(output_dir, LATEST)) else []


def is_checkpoint(path: str) -> bool:
    """Whether path is a checkpoint directory itself (not a training directory holding checkpoints)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINT_FILES)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory as it is, or a training output directory's latest checkpoint."""
    if is_checkpoint(path):
        return path
    return latest_checkpoint(path) or path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "latest":
        sys.exit("usage: python -m llama_mp.output_dir latest OUTPUT_DIR")
    try:
        found = latest_checkpoint(sys.argv[2])
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    if found is None:
        sys.exit(f"error: {sys.argv[2]}: no checkpoint yet ({LATEST} is missing)")
    print(found)
