"""r0_s2 and r1_s3: per-client {input, output} JSONL for the downstream prediction task.

  python -m step0_coldstart.sft_federated --dataset configs/tabular/abalone.yaml --split_type train \
      --num_client 4 --split_method dirichlet --alpha 0.5 --output_dir runs/tabular/fed        # r0_s2: real rows
  python -m step0_coldstart.sft_federated --dataset configs/tabular/abalone.yaml --split_type train \
      --input_file runs/tabular/r1/abalone.syn.csv --output_dir runs/tabular/syn1_fed            # r1_s3: synthetic rows
  python -m step0_coldstart.sft_federated --dataset configs/tabular/med.yaml --split_method site \
      --output_dir runs/tabular/fed                                                # one client per hospital site

Rows come from the data set's own split (--split_type train | val | test, the persisted split) or from --input_file, a
CSV with the schema's columns (the synthetic rows of r1_s2). Each row becomes
  {"input": the data set's task question filled with the row's features, "output": the target as the model answers it}
in <output_dir>/<name>_client_<i>.<split_type>.jsonl. Rows without a target are skipped (counted).
Split methods: `none` gives every client all rows (the reference's scripts use one client); `dirichlet` is the usual
label-skewed split: for every label, client shares are drawn from Dirichlet(alpha) and that label's rows (shuffled) are
cut by them, so each row goes to exactly one client. Regression targets are cut into --num_bins quantile bins first.
`site` gives one client per value of a column (--site_column, default the YAML's site_column): client i holds exactly
the rows of the i-th site in sorted order of the site values; the sites are those of the real data, so the synthetic
rows of r1_s3 get the same client numbers (rows without a site are skipped, counted); --num_client, when given, must
equal the number of sites. The options are FederatedOptions': every one also a key of a --config YAML file (flags over
the file; llama_mp/config.py).
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from llama_mp import cli, outputs
from llama_mp.config import PositiveInt, parse_config, require
from llama_mp.jsonl import write_jsonl_atomic
from step0_coldstart.tabular import (Schema, answer_text, load_rows, load_schema, read_rows_csv, splits, target_bins,
                                     task_question)


@dataclass
class FederatedOptions:
    """r0_s2's and r1_s3's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    dataset: Optional[str] = field(default=None, metadata={"help": "data set YAML"})
    ds_name: Optional[str] = field(default=None, metadata={"help": "name in the output files (default: the YAML's name)"})
    input_file: Optional[str] = field(default=None, metadata={"help": "CSV of rows (default: the data set's own split)"})
    split_type: Literal["train", "val", "test"] = "train"
    num_client: Optional[PositiveInt] = field(default=None, metadata={"help": "default 1 (site: the site count)"})
    split_method: Literal["none", "dirichlet", "site"] = "none"
    site_column: Optional[str] = field(default=None, metadata={
        "help": "site split: the column (default: the YAML's site_column)"})
    alpha: float = field(default=0.5, metadata={"help": "dirichlet split: the concentration (> 0)"})
    num_bins: PositiveInt = field(default=4, metadata={"help": "target bins of a regression data set"})
    seed: int = 42
    output_dir: Optional[str] = None
    splits_dir: str = "runs/tabular/splits"


def client_split(labels: list[str], num_client: int, method: str, alpha: float = 0.5, seed: int = 42) -> list[list[int]]:
    """Row indices per client."""
    if method == "none":
        return [list(range(len(labels))) for _ in range(num_client)]
    if method != "dirichlet":
        raise ValueError(f"unknown split method {method!r} (none or dirichlet)")
    rng = np.random.default_rng(seed)
    clients: list[list[int]] = [[] for _ in range(num_client)]
    for label in sorted(set(labels)):
        members = np.array([i for i, y in enumerate(labels) if y == label])
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(num_client, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            clients[client] += part.tolist()
    return [sorted(c) for c in clients]


def site_split(sites: list, names: list[str]) -> list[list[int]]:
    """Row indices per client: client i holds exactly the rows whose site is names[i]."""
    return [[i for i, site in enumerate(sites) if site == name] for name in names]


def federated_records(schema: Schema, rows: list[dict]) -> list[dict]:
    return [{"input": task_question(schema, r), "output": answer_text(schema, r)} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.sft_federated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing client files")
    args, opts = parse_config(parser, FederatedOptions)
    require(opts, "dataset", "output_dir")
    if opts.alpha <= 0:
        raise ValueError(f"--alpha must be positive, got {opts.alpha}")
    schema = load_schema(opts.dataset)
    real = load_rows(schema)  # also fills the category lists the label texts need
    if opts.input_file:
        rows = read_rows_csv(opts.input_file, schema, "input")
    else:
        rows = [real[i] for i in splits(schema, len(real), opts.splits_dir)[opts.split_type]]
    usable = [r for r in rows if r[schema.target] is not None]  # none at all: empty client files (nothing to learn)
    sites = []
    if opts.split_method == "site":
        column = opts.site_column or schema.site_column
        if not column:
            raise ValueError(f"{opts.dataset}: --split_method site needs --site_column or the YAML's site_column")
        if column not in schema.features:
            raise ValueError(f"--site_column {column!r}: not a feature column of {opts.dataset}")
        sites = sorted({str(r[column]) for r in real if r[column] is not None})
        if opts.num_client not in (None, len(sites)):
            raise ValueError(f"--num_client {opts.num_client}: {opts.dataset} has {len(sites)} sites in {column} "
                             f"({', '.join(sites)})")
        usable = [r for r in usable if r[column] is not None]  # a row without a site belongs to no client
    num_client = len(sites) if sites else opts.num_client or 1
    name = opts.ds_name or schema.name
    paths = [os.path.join(opts.output_dir, f"{name}_client_{i}.{opts.split_type}.jsonl") for i in range(num_client)]
    outputs.claim(paths, outputs.command_settings(opts), args.overwrite)
    if sites:
        clients = site_split([str(r[column]) for r in usable], sites)
    else:
        clients = client_split(target_bins(schema, usable, opts.num_bins) if usable else [], num_client,
                               opts.split_method, opts.alpha, opts.seed)
    records = federated_records(schema, usable)
    for path, indices in zip(paths, clients):
        write_jsonl_atomic(path, [records[i] for i in indices])
    outputs.complete(paths)
    skipped = len(rows) - len(usable)
    print(f"{len(usable)} rows ({skipped} without a target{' or a site' if sites else ''} skipped) -> {num_client} "
          f"clients ({opts.split_method}{': ' + ', '.join(sites) if sites else ''}): {[len(c) for c in clients]} rows "
          f"in {opts.output_dir}")


if __name__ == "__main__":
    cli.run(main)
