"""r0_s3: anchor rows for scoring synthetic rows: the real rows nearest to KMeans centres of the scoring split.

  python -m step0_coldstart.synscore_anchors --dataset configs/tabular/abalone.yaml \
      [--config configs/synscore_anchors.yaml] [--num_clusters 32] --output_dir runs/tabular/score_anchors

The scoring split is the data set's validation split: the reference took anchors from the training rows, and the test
split must stay unseen until the final evaluation. Features are standardised numbers and one-hot categories (missing
numbers at the mean). Writes <output_dir>/<name>_anchors.csv (the schema's columns, one real row per cluster, distinct).
The options are AnchorsConfig's: every one a key of --config's YAML (default configs/synscore_anchors.yaml) and a flag
over it (llama_mp/config.py).
"""

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from sklearn.cluster import KMeans

from llama_mp import cli, outputs
from llama_mp.config import PositiveInt, parse_config, require
from step0_coldstart.tabular import Encoder, Schema, load_rows, load_schema, splits, write_rows_csv


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class AnchorsConfig:
    """r0_s3's options: keys of --config's YAML (configs/synscore_anchors.yaml) and flags."""
    dataset: Optional[str] = field(default=None, metadata={"help": "data set YAML"})
    num_clusters: PositiveInt = field(default=32, metadata={"help": "KMeans clusters: one anchor row each"})
    seed: int = field(default=0, metadata={"help": "of KMeans"})
    output_dir: str = "runs/tabular/score_anchors"
    splits_dir: str = "runs/tabular/splits"


def anchors(schema: Schema, rows: list[dict], num_clusters: int, seed: int = 0) -> list[dict]:
    """One distinct real row per cluster centre: the nearest row not already taken."""
    if num_clusters > len(rows):
        raise ValueError(f"{schema.path}: num_clusters {num_clusters} exceeds the {len(rows)} rows of the scoring split")
    matrix = Encoder(schema, rows).distance_matrix(rows)
    centres = KMeans(n_clusters=num_clusters, random_state=seed, n_init=4).fit(matrix).cluster_centers_
    taken, chosen = set(), []
    for centre in centres:
        order = np.argsort(((matrix - centre) ** 2).sum(1))
        index = next(int(i) for i in order if int(i) not in taken)
        taken.add(index)
        chosen.append(rows[index])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.synscore_anchors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/synscore_anchors.yaml"),
                        help="YAML of AnchorsConfig keys (every key is also a flag, over the file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing anchors file")
    args, config = parse_config(parser, AnchorsConfig)
    require(config, "dataset")
    schema = load_schema(config.dataset)
    rows = load_rows(schema)
    scoring = [rows[i] for i in splits(schema, len(rows), config.splits_dir)["val"]]
    chosen = anchors(schema, scoring, config.num_clusters, config.seed)
    path = os.path.join(config.output_dir, f"{schema.name}_anchors.csv")
    outputs.claim([path], outputs.command_settings(config), args.overwrite)
    write_rows_csv(path, schema, chosen)
    outputs.complete([path])
    print(f"wrote {len(chosen)} anchors to {path}")


if __name__ == "__main__":
    cli.run(main)
