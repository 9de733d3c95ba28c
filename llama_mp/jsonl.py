"""Files: JSON, JSON Lines and YAML read with errors that name the file (and line), JSONL appended as work finishes,
and atomic writes."""

import json
import os
import signal
from typing import Callable, Iterable


def read_text(path: str) -> str:
    """A UTF-8 text file (a prompt template, ...), or an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        return f.read()


def iter_jsonl(path: str, torn_tail_ok: bool = False):
    """(line number, record) for every object line of a JSONL file; anything that is not a JSON object is an error
    naming the file and line. With torn_tail_ok, an unterminated last line (an appender killed mid-line) is skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail_ok and number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str, torn_tail_ok: bool = False) -> list[dict]:
    return [record for _, record in iter_jsonl(path, torn_tail_ok)]


def drop_torn_tail(path: str) -> None:
    """Cut an unterminated last line (left by a kill during an append) so that the next append starts clean."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def keep_steps_upto(path: str, step: int) -> None:
    """A resumed run's metrics: drop the records logged after the checkpoint it resumes from (they are logged again),
    so the file reads as if the run had never stopped."""
    if not os.path.exists(path):
        return
    drop_torn_tail(path)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def read_json(path: str):
    """A whole JSON file; a missing file or bad JSON is a one-line error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_yaml(path: str, what: str = "config file") -> dict:
    """A YAML file of options as a dict; a missing file, bad YAML or a non-mapping is a one-line error naming it."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    return loaded


def read_records(path: str) -> list[tuple[int, dict]]:
    """(position, record) from a JSON list (position = 1-based index) or a JSONL file (position = line number)."""
    if path.endswith(".json"):
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return list(enumerate(data, start=1))
    return list(iter_jsonl(path))


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it: readers never see a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
    _crash_test_point()


def _crash_test_point() -> None:
    """Kill tests: with LLAMA_MP_RENAME_COUNTER=FILE every atomic rename of a run appends a byte to FILE; the process
    that makes rename number LLAMA_MP_STOP_AT_RENAME stops itself right after it (SIGSTOP), so that the test can kill
    the whole job at exactly that instant."""
    counter = os.environ.get("LLAMA_MP_RENAME_COUNTER")
    if not counter:
        return
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
        count = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if str(count) == os.environ.get("LLAMA_MP_STOP_AT_RENAME"):
        os.kill(os.getpid(), signal.SIGSTOP)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str, data, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk, so a kill loses at most the record being written."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
