"""r1_s2: parsed synthetic rows -> CSV with the data set's columns (the input of r1_s3 and of the evaluation).

  python -m step0_coldstart.convert_raw_to_csv --dataset configs/tabular/abalone.yaml \
      --raw_file runs/tabular/r1/abalone.raw.jsonl --output_file runs/tabular/r1/abalone.syn.csv [--status SUCCESS]

Every sample whose status is among --status (default SUCCESS only: the rows a downstream model can use as they are)
becomes one row; missing values stay empty cells.
"""

import argparse

from llama_mp import cli, outputs
from llama_mp.jsonl import iter_jsonl
from step0_coldstart.tabular import STATUS_SCORE, SUCCESS, load_schema, write_rows_csv


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.convert_raw_to_csv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--raw_file", required=True)
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--status", nargs="+", default=[SUCCESS], choices=sorted(STATUS_SCORE))
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args()
    schema = load_schema(opts.dataset)
    rows, total = [], 0
    for line, record in iter_jsonl(opts.raw_file):
        total += 1
        if not isinstance(record.get("result"), dict) or record.get("status") not in STATUS_SCORE:
            raise ValueError(f"{opts.raw_file}:{line}: a raw sample needs \"status\" and a \"result\" object")
        if record["status"] in opts.status:
            rows.append(record["result"])
    outputs.claim([opts.output_file], outputs.command_settings(opts), opts.overwrite)
    write_rows_csv(opts.output_file, schema, rows)
    outputs.complete([opts.output_file])
    print(f"wrote {len(rows)} of {total} samples to {opts.output_file}")


if __name__ == "__main__":
    cli.run(main)
