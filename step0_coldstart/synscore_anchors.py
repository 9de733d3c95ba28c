"""r0_s3: anchor rows for scoring synthetic rows: the real rows nearest to KMeans centres of the scoring split.

  python -m step0_coldstart.synscore_anchors --dataset configs/tabular/abalone.yaml \
      [--config configs/synscore_anchors.yaml] [--num_clusters 32] --output_dir runs/tabular/score_anchors

The scoring split is the data set's validation split: the reference took anchors from the training rows, and the test
split must stay unseen until the final evaluation. Features are standardised numbers and one-hot categories (missing
numbers at the mean). Writes <output_dir>/<name>_anchors.csv (the schema's columns, one real row per cluster, distinct).
"""

import argparse
import os

import numpy as np
from sklearn.cluster import KMeans

from llama_mp import cli, outputs
from llama_mp.jsonl import read_yaml
from step0_coldstart.tabular import Encoder, Schema, load_rows, load_schema, splits, write_rows_csv


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/synscore_anchors.yaml"))
    parser.add_argument("--num_clusters", type=int, default=None)
    parser.add_argument("--output_dir", default="runs/tabular/score_anchors")
    parser.add_argument("--splits_dir", default="runs/tabular/splits")
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args()
    config = read_yaml(opts.config)
    for key, default in (("num_clusters", 32), ("seed", 0)):
        value = config.setdefault(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or (key == "num_clusters" and value < 1):
            raise ValueError(f"{opts.config}: {key} must be {'a positive' if key == 'num_clusters' else 'an'} "
                             f"integer, got {value!r}")
    num_clusters = opts.num_clusters or config["num_clusters"]
    schema = load_schema(opts.dataset)
    rows = load_rows(schema)
    scoring = [rows[i] for i in splits(schema, len(rows), opts.splits_dir)["val"]]
    chosen = anchors(schema, scoring, num_clusters, config["seed"])
    path = os.path.join(opts.output_dir, f"{schema.name}_anchors.csv")
    outputs.claim([path], outputs.command_settings(opts), opts.overwrite)
    write_rows_csv(path, schema, chosen)
    outputs.complete([path])
    print(f"wrote {len(chosen)} anchors to {path}")


if __name__ == "__main__":
    cli.run(main)
