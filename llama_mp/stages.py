"""One way to resume a driver: a run directory, locked while a run uses it, and the record of its finished steps.

A step is one command from named inputs to named outputs. It is finished when its outputs exist and its entry in
<run_dir>/stages.json, written after them, says so. A rerun skips finished steps and runs the others again: each
command resumes its own work (jobs from their last chunk, trainers from their last checkpoint), and a command that
had finished before its step could be recorded is found complete by its outputs' own record (llama_mp.outputs), so
it is recorded without running again. Drivers group steps into stages for their reports (seconds, figures).

The run directory is locked (flock on <run_dir>/.lock) for as long as the driver or any command it started lives:
the lock's file descriptor is handed to every command, so a rerun while a killed driver's commands still run is
refused with one line instead of sharing the directory with them.
"""

import fcntl
import json
import os
import shutil
from typing import Callable, Optional, Sequence

from llama_mp import outputs as outputs_record
from llama_mp.jsonl import write_json_atomic


class RunDir:
    def __init__(self, path: str, fresh: bool = False):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.lock_fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise ValueError(f"{self.path}: in use by another run (or by commands of a killed one that are still "
                             f"ending); wait for it, or use another run directory") from None
        os.set_inheritable(self.lock_fd, True)  # commands hold the lock too (see the module doc)
        if fresh:
            for name in os.listdir(self.path):
                if name != ".lock":
                    target = os.path.join(self.path, name)
                    shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
        self.state_file = os.path.join(self.path, "stages.json")
        self.state = {"stages": {}, "steps": {}}
        if os.path.exists(self.state_file):
            with open(self.state_file) as f:
                self.state = json.load(f)

    def _save(self) -> None:
        write_json_atomic(self.state_file, self.state)

    # -- steps: one command each ----------------------------------------------------------------------------------
    def step(self, name: str, run: Callable[[], None], outputs: Optional[Sequence[str]] = None) -> bool:
        """Run step `name` unless it is finished; True if it ran. `outputs`: the command's final files (those
        recorded by llama_mp.outputs); a trainer has none and is rerun with --resume until its step is recorded."""
        if name in self.state["steps"]:
            return False
        ran = not (outputs and outputs_record.is_complete(outputs))
        if ran:
            run()
        self.state["steps"][name] = {"outputs": [os.path.relpath(p, self.path) for p in outputs or []]}
        self._save()
        return ran

    # -- stages: a driver's report entries --------------------------------------------------------------------------
    def stage(self, name: str) -> Optional[dict]:
        """The recorded entry of a finished stage, or None."""
        entry = self.state["stages"].get(name)
        return entry if entry and entry.get("status") == "done" else None

    def record_stage(self, name: str, entry: dict) -> None:
        self.state["stages"][name] = entry
        self._save()
