"""r1_s2: parsed synthetic rows -> CSV with the data set's columns (the input of r1_s3 and of the evaluation).

  python -m step0_coldstart.convert_raw_to_csv --dataset configs/tabular/abalone.yaml \
      --raw_file runs/tabular/r1/abalone.raw.jsonl --output_file runs/tabular/r1/abalone.syn.csv [--status SUCCESS]

Every sample whose status is among --status (default SUCCESS only: the rows a downstream model can use as they are)
becomes one row; missing values stay empty cells. The options are RawToCsvOptions': every one also a key of a
--config YAML file (flags over the file; llama_mp/config.py).
"""

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

from llama_mp import cli, outputs
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl
from step0_coldstart.tabular import STATUS_SCORE, SUCCESS, load_schema, write_rows_csv

Status = Literal[tuple(sorted(STATUS_SCORE))]  # a sample's status (tabular.py)


@dataclass
class RawToCsvOptions:
    """r1_s2's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    dataset: Optional[str] = field(default=None, metadata={"help": "data set YAML"})
    raw_file: Optional[str] = field(default=None, metadata={"help": "r1_s1's <name>.raw.jsonl"})
    output_file: Optional[str] = field(default=None, metadata={"help": "CSV of the kept rows"})
    status: list[Status] = field(default_factory=lambda: [SUCCESS], metadata={
        "help": "the statuses whose samples become rows (one or more)"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.convert_raw_to_csv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_file")
    args, opts = parse_config(parser, RawToCsvOptions)
    require(opts, "dataset", "raw_file", "output_file", "status")
    schema = load_schema(opts.dataset)
    rows, total = [], 0
    for line, record in iter_jsonl(opts.raw_file):
        total += 1
        if not isinstance(record.get("result"), dict) or record.get("status") not in STATUS_SCORE:
            raise ValueError(f"{opts.raw_file}:{line}: a raw sample needs \"status\" and a \"result\" object")
        if record["status"] in opts.status:
            rows.append(record["result"])
    outputs.claim([opts.output_file], outputs.command_settings(opts), args.overwrite)
    write_rows_csv(opts.output_file, schema, rows)
    outputs.complete([opts.output_file])
    print(f"wrote {len(rows)} of {total} samples to {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
