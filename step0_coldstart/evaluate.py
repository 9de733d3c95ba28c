"""ML efficiency of synthetic rows (the TabDDPM protocol), with the naive generator and real rows beside them.

  python -m step0_coldstart.evaluate --dataset configs/tabular/abalone.yaml \
      [--synthetic NAME=rows.jsonl ...] [--n_rows 1000] [--splits_dir runs/tabular/splits] [--output_file F.json]

A HistGradientBoosting model is trained on N rows of each generator and on the whole real training split, and each is
tested on the real test split: macro-F1 for classification, R2 for regression; ratio = generator / real. Generators:
  real   N rows drawn from the real training split (what N real rows are worth);
  naive  each column sampled independently given the target (regression targets binned into quantiles): a generator
         that does not beat it has learned nothing;
  NAME   rows from a file: JSONL of {"text": model output} (parsed) or of typed row objects, or a CSV with the columns.
Also per generator: the share of valid rows, the share that copy a training row exactly, and the median distance to
the closest real training record (standardised numbers, one-hot categories; over the first 500 rows). Prints JSON
{dataset: {generator: {"syn", "real", "ratio", "valid_share", "copy_share", "dcr_median", "rows"}}} and a table.
"""

import argparse
import json

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import f1_score, r2_score

from llama_mp import cli
from llama_mp.jsonl import iter_jsonl, write_json_atomic
from step0_coldstart.tabular import (SUCCESS, Encoder, Schema, load_rows, load_schema, parse_row, read_rows_csv,
                                     splits, target_bins)


def target_vector(schema: Schema, rows: list[dict]) -> np.ndarray:
    values = [r[schema.target] for r in rows]
    return np.array(values, dtype=object if schema.task == "classification" else float)


def score(schema: Schema, encoder: Encoder, train: list[dict], test: list[dict], seed: int = 0) -> float:
    """Macro-F1 (classification) or R2 (regression) on `test` of a booster fitted on `train`."""
    y_train = target_vector(schema, train)
    if schema.task == "classification":
        if len(set(y_train)) < 2:
            return 0.0
        model = HistGradientBoostingClassifier(categorical_features=encoder.categorical_mask(), random_state=seed)
        model.fit(encoder.booster_matrix(train), y_train.astype(str))
        return float(f1_score(target_vector(schema, test).astype(str), model.predict(encoder.booster_matrix(test)),
                              average="macro"))
    model = HistGradientBoostingRegressor(categorical_features=encoder.categorical_mask(), random_state=seed)
    model.fit(encoder.booster_matrix(train), y_train)
    return float(r2_score(target_vector(schema, test), model.predict(encoder.booster_matrix(test))))


def naive_rows(schema: Schema, train: list[dict], n: int, seed: int, bins: int = 10) -> list[dict]:
    """Each column drawn independently from the training rows of the same target class (or target quantile bin)."""
    rng = np.random.default_rng(seed)
    groups = np.array(target_bins(schema, train, bins))
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    rows = []
    for _ in range(n):
        group = members[groups[int(rng.integers(len(train)))]]  # classes in their training proportions
        rows.append({c: train[int(rng.choice(group))][c] for c in schema.columns})  # each column drawn on its own
    return rows


def synthetic_rows(path: str, schema: Schema) -> tuple[list[dict], int]:
    """(valid typed rows, rows read) from a JSONL of model outputs / row objects, or a CSV."""
    if path.endswith(".csv"):  # typed rows with the schema's columns (r1_s2): empty cells are missing values
        rows = read_rows_csv(path, schema, "synthetic")
        return [r for r in rows if r[schema.target] is not None], len(rows)
    texts = [next((r[k] for k in ("text", "answer") if isinstance(r.get(k), str)), None) or json.dumps(r)
             for _, r in iter_jsonl(path)]  # model outputs ("text", or r1_s1's raw "answer") or row objects
    valid = []
    for text in texts:
        status, values = parse_row(text, schema)
        if status == SUCCESS and values[schema.target] is not None:
            valid.append(values)
    return valid, len(texts)


def generator_figures(schema, encoder, rows, total, train, test, real_score, train_keys, train_matrix, seed) -> dict:
    if not rows:
        return {"syn": None, "real": round(real_score, 4), "ratio": 0.0, "valid_share": 0.0, "copy_share": 0.0,
                "dcr_median": None, "rows": 0}
    syn = score(schema, encoder, rows, test, seed)
    copies = sum(json.dumps(r, sort_keys=True, default=str) in train_keys for r in rows)
    matrix = encoder.distance_matrix(rows[:500])
    squared = (matrix ** 2).sum(1)[:, None] + (train_matrix ** 2).sum(1)[None, :] - 2 * matrix @ train_matrix.T
    nearest = np.sqrt(np.clip(squared.min(axis=1), 0, None))
    return {"syn": round(syn, 4), "real": round(real_score, 4), "ratio": round(syn / real_score, 4) if real_score else None,
            "valid_share": round(len(rows) / max(total, 1), 4), "copy_share": round(copies / len(rows), 4),
            "dcr_median": round(float(np.median(nearest)), 4), "rows": len(rows)}


def evaluate(schema: Schema, rows: list[dict], split: dict, synthetic: dict[str, tuple[list[dict], int]],
             n_rows: int, seed: int = 0) -> dict:
    train, test = [rows[i] for i in split["train"]], [rows[i] for i in split["test"]]
    encoder = Encoder(schema, train)
    real_score = score(schema, encoder, train, test, seed)
    rng = np.random.default_rng(seed)
    real_sample = [train[i] for i in rng.choice(len(train), size=min(n_rows, len(train)), replace=False)]
    generators = {"real": (real_sample, len(real_sample)), "naive": (naive_rows(schema, train, n_rows, seed), n_rows),
                  **synthetic}
    train_keys = {json.dumps(r, sort_keys=True, default=str) for r in train}
    train_matrix = encoder.distance_matrix(train)
    return {name: generator_figures(schema, encoder, gen_rows, total, train, test, real_score, train_keys,
                                    train_matrix, seed)
            for name, (gen_rows, total) in generators.items()}


def table(results: dict) -> str:
    lines = ["| data set | generator | syn | real | ratio | valid | copies | DCR median |", "|---|---|---|---|---|---|---|---|"]
    for dataset, gens in results.items():
        for name, f in gens.items():
            lines.append(f"| {dataset} | {name} | {f['syn']} | {f['real']} | {f['ratio']} | {f['valid_share']} | "
                         f"{f['copy_share']} | {f['dcr_median']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, help="a data set YAML (repeatable)")
    parser.add_argument("--synthetic", action="append", default=[], help="NAME=path (applies to a single --dataset)")
    parser.add_argument("--n_rows", type=int, default=1000)
    parser.add_argument("--splits_dir", default="runs/tabular/splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_file", default=None)
    opts = parser.parse_args()
    if opts.synthetic and len(opts.dataset) > 1:
        raise ValueError("--synthetic files belong to one data set: give a single --dataset")
    results = {}
    for path in opts.dataset:
        schema = load_schema(path)
        rows = load_rows(schema)
        split = splits(schema, len(rows), opts.splits_dir)
        synthetic = {}
        for item in opts.synthetic:
            name, _, file = item.partition("=")
            if not file:
                raise ValueError(f"--synthetic {item!r}: expected NAME=path")
            synthetic[name] = synthetic_rows(file, schema)
        results[schema.name] = evaluate(schema, rows, split, synthetic, opts.n_rows, opts.seed)
    if opts.output_file:
        write_json_atomic(opts.output_file, results)
    print(json.dumps(results))
    print(table(results))


if __name__ == "__main__":
    cli.run(main)
