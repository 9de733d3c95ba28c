"""Resumable, data-parallel jobs over keyed items (sampling, self-judging, scoring).

The items are cut into fixed chunks; chunk c belongs to data-parallel replica c % replicas. When a chunk is done, its
records and then a marker line are appended (and fsynced) to `<output>.parts/part-<replica>.jsonl`; a kill -9 loses at
most the chunk in flight. A rerun of the same command skips every chunk that has its marker, in any part file (so
the number of processes may change between runs), and redoes the rest; deterministic work (per-item seeds) makes the
redone chunk identical. `merge` then writes the output file atomically, one record per key, in key order.

The settings that determine the records are kept in the output's record (llama_mp.outputs: `<output>.status.json`,
"running" until the merged file is written, then "complete"); resuming with other settings is refused, as is replacing
a finished output without `overwrite`. A run killed after writing the output but before recording it is finished
again by a rerun (every chunk is done: the merge rewrites the same file).
"""

import json
import os
import shutil
from typing import Callable, Sequence

import torch.distributed as dist

from llama_mp import outputs
from llama_mp.distributed import DistInfo, barrier
from llama_mp.jsonl import append_jsonl, drop_torn_tail, read_jsonl, write_json_atomic, write_jsonl_atomic
from llama_mp.progress import Progress

DONE = "_chunk_done"


def parts_dir(output_file: str) -> str:
    return output_file + ".parts"


def prepare(output_file: str, settings: dict, overwrite: bool, info: DistInfo) -> None:
    """Check (or start) the job's parts directory before any work. Every rank calls it; rank 0 checks, and if that
    fails every rank raises the same one-line error (none is left waiting)."""
    error = None
    if info.is_main:
        try:
            _prepare_parts(output_file, settings, overwrite)
        except (ValueError, OSError) as err:
            error = str(err)
    if info.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)


def _prepare_parts(output_file: str, settings: dict, overwrite: bool) -> None:
    parts = parts_dir(output_file)
    if outputs.is_complete([output_file]) and os.path.isdir(parts) and not overwrite:
        shutil.rmtree(parts)  # left by a kill between the record and the clean-up
    if os.path.isdir(parts) and outputs.read_record([output_file]) is None and not overwrite:
        raise ValueError(f"{parts}: an unfinished run without its record ({outputs.record_path([output_file])}); "
                         f"pass --overwrite to start over")
    outputs.claim([output_file], settings, overwrite)  # the settings of a resumed run must equal the first run's
    if overwrite and os.path.exists(parts):
        shutil.rmtree(parts)
    os.makedirs(parts, exist_ok=True)


def run(output_file: str, items: Sequence, item_key: Callable, chunk_size: int,
        process: Callable[[list], list[dict]], info: DistInfo, desc: str) -> None:
    """Process every chunk not yet done; `process(chunk)` returns the chunk's records (each carrying its item key).

    All ranks of a model-parallel group call `process` together (they compute as one); its rank 0 appends."""
    parts = parts_dir(output_file)
    chunking = {"chunk_size": chunk_size, "items": len(items)}  # chunk c means the same items only under these
    chunking_file = os.path.join(parts, "chunking.json")
    if os.path.exists(chunking_file):
        with open(chunking_file) as f:
            before = json.load(f)
        if before != chunking:
            raise ValueError(f"{parts}: started with {before['items']} items in chunks of {before['chunk_size']}, now "
                             f"{len(items)} in chunks of {chunk_size}: resume with the same items and batch size "
                             f"(--max_batch_size), or pass --overwrite")
    elif info.is_main:
        write_json_atomic(chunking_file, chunking)
    done = done_chunks(parts)
    chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]
    mine = [c for c in range(len(chunks)) if c % info.data_parallel_size == info.data_parallel_rank and c not in done]
    part_file = os.path.join(parts, f"part-{info.data_parallel_rank:05d}.jsonl")
    todo_items = sum(len(chunks[c]) for c in mine)
    progress = Progress(todo_items, f"{desc} (replica {info.data_parallel_rank})", "items")
    if info.is_main and done:
        print(f"[{desc}] resuming: {len(done)} of {len(chunks)} chunks already done", flush=True)
    if info.model_parallel_rank == 0:
        drop_torn_tail(part_file)
    crash_after = int(os.environ.get("LLAMA_MP_CRASH_AFTER_CHUNKS", "-1"))  # crash tests: die like kill -9
    for n, c in enumerate(mine):
        if n == crash_after:
            os._exit(137)
        records = process(chunks[c])
        if info.model_parallel_rank == 0:
            append_jsonl(part_file, [*records, {DONE: c, "items": [item_key(x) for x in chunks[c]]}])
        progress.update(len(chunks[c]))
    barrier()


def done_chunks(parts: str) -> set[int]:
    return {r[DONE] for r in read_parts(parts) if DONE in r}


def read_parts(parts: str) -> list[dict]:
    if not os.path.isdir(parts):
        return []
    records = []
    for name in sorted(os.listdir(parts)):
        if name.startswith("part-") and name.endswith(".jsonl"):
            records.extend(read_jsonl(os.path.join(parts, name), torn_tail_ok=True))
    return records


def merge(output_file: str, record_key: Callable[[dict], object], info: DistInfo) -> list[dict]:
    """Rank 0: one record per key (a redone chunk's copy wins), sorted by key, written atomically; parts removed."""
    if not info.is_main:
        barrier()
        return []
    parts = parts_dir(output_file)
    by_key = {}
    for record in read_parts(parts):
        if DONE not in record:
            by_key[record_key(record)] = record
    records = [by_key[k] for k in sorted(by_key)]
    if output_file.endswith(".json"):
        write_json_atomic(output_file, records)
    else:
        write_jsonl_atomic(output_file, records)
    outputs.complete([output_file])
    shutil.rmtree(parts)
    barrier()
    return records
