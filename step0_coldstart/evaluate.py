"""ML efficiency of synthetic rows (the TabDDPM protocol), with the naive generator and real rows beside them.

  python -m step0_coldstart.evaluate --dataset configs/tabular/abalone.yaml \
      [--synthetic NAME=rows.jsonl ...] [--n_rows 1000] [--splits_dir runs/tabular/splits] [--output_file F.json]

A HistGradientBoosting model is trained on N rows of each generator and on the whole real training split, and each is
tested on the real test split: macro-F1 for classification, R2 for regression; ratio = generator / real. Generators:
  real   N rows drawn from the real training split (what N real rows are worth);
  naive  each column sampled independently given the target (regression targets binned into quantiles): a generator
         that does not beat it has learned nothing;
  NAME   rows from a file: JSONL of {"text": model output} (parsed) or of typed row objects, or a CSV with the columns;
  real@M, naive@M  where the files hold fewer rows than N (M: the largest of them): both baselines at M rows, the
         mean ratio over 5 draws (ratio_std beside it), since ML efficiency on a few dozen rows is low for any
         generator; a generator of M rows is compared with these.
Also per generator: the share of valid rows, the share that copy a training row exactly, and the median distance to
the closest real training record (standardised numbers, one-hot categories; over the first 500 rows).
Fidelity, beyond what a predictor can use, against the real training rows (for `real`: the training rows it did not
draw, so that it is not compared with itself, or one half of the training split against the other where it drew
nearly all of them):
  detection_auc  a HistGradientBoosting classifier is trained to tell real rows from the generator's rows (all
                 columns, target included; equally many of each, at most 2,000, seed fixed) and its ROC AUC is read on
                 held-out rows of both (half of each): 0.5 = indistinguishable, 1.0 = every row gives itself away;
  columns        per column: numbers, the 1-D Wasserstein distance divided by the real column's std (so that columns
                 compare; missing values left out); categories, the total variation distance (missing is a value of
                 its own); wasserstein_mean and tv_mean average them.
Prints JSON {dataset: {generator: {"syn", "real", "ratio", "valid_share", "copy_share", "dcr_median", "rows",
"detection_auc", "wasserstein_mean", "tv_mean", "columns"}}} and a table. The options are EvaluateOptions': every one
also a key of a --config YAML file (flags over the file; llama_mp/config.py).
"""

import argparse
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import f1_score, r2_score, roc_auc_score
from sklearn.model_selection import train_test_split

from llama_mp import cli
from llama_mp.config import parse_config, require
from llama_mp.jsonl import iter_jsonl, write_json_atomic
from step0_coldstart.tabular import (SUCCESS, Encoder, Schema, load_rows, load_schema, parse_row, read_rows_csv,
                                     splits, target_bins)


@dataclass
class EvaluateOptions:
    """The evaluation's options: keys of --config's YAML and flags (llama_mp/config.py)."""
    dataset: list[str] = field(default_factory=list, metadata={"help": "a data set YAML (repeatable)"})
    synthetic: list[str] = field(default_factory=list, metadata={"help": "NAME=path (applies to a single --dataset)"})
    n_rows: int = 1000
    splits_dir: str = "runs/tabular/splits"
    seed: int = 0
    output_file: Optional[str] = None


SAME_SIZE_DRAWS = 5  # draws of the same-size real and naive baselines (see same_size_baselines)


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


def is_categorical(schema: Schema, column: str) -> bool:
    return schema.columns[column] == "category" or (column == schema.target and schema.task == "classification")


def wasserstein_1d(a, b) -> float:
    """W1 between two empirical distributions: the area between their CDFs."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def total_variation(a: list, b: list) -> float:
    """Half the L1 distance between the value frequencies of two samples (None is a value of its own)."""
    values = set(a) | set(b)
    return 0.5 * sum(abs(a.count(v) / len(a) - b.count(v) / len(b)) for v in values)


def column_distances(schema: Schema, real: list[dict], syn: list[dict]) -> dict:
    """{column: TV (categories) or W1 / real std (numbers)}; None where a sample has no value at all."""
    out = {}
    for column in schema.columns:
        if is_categorical(schema, column):
            out[column] = round(total_variation([r[column] for r in real], [r[column] for r in syn]), 4)
            continue
        a = np.array([r[column] for r in real if r[column] is not None], dtype=float)
        b = np.array([r[column] for r in syn if r[column] is not None], dtype=float)
        out[column] = round(wasserstein_1d(a, b) / (a.std() or 1.0), 4) if len(a) and len(b) else None
    return out


def detection_matrix(schema: Schema, encoder: Encoder, rows: list[dict]) -> np.ndarray:
    """The booster's features plus the target (coded like a category for classification)."""
    if is_categorical(schema, schema.target):
        codes = {v: i for i, v in enumerate(schema.categories.get(schema.target, []))}
        target = [codes.get(str(r[schema.target]), np.nan) if r[schema.target] is not None else np.nan for r in rows]
    else:
        target = [np.nan if r[schema.target] is None else float(r[schema.target]) for r in rows]
    return np.concatenate([encoder.booster_matrix(rows), np.array(target, dtype=float)[:, None]], axis=1)


def detection_auc(schema: Schema, encoder: Encoder, real: list[dict], syn: list[dict], seed: int = 0,
                  max_rows: int = 2000) -> float:
    """ROC AUC of a classifier telling real from synthetic rows, on held-out rows (balanced classes)."""
    rng = np.random.default_rng(seed)
    n = min(len(real), len(syn), max_rows)
    if n < 4:
        return None
    picked = [[rows[i] for i in rng.choice(len(rows), size=n, replace=False)] for rows in (real, syn)]
    x = np.concatenate([detection_matrix(schema, encoder, rows) for rows in picked])
    y = np.array([0] * n + [1] * n)
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    mask = encoder.categorical_mask() + [is_categorical(schema, schema.target)]
    model = HistGradientBoostingClassifier(categorical_features=mask, random_state=seed).fit(x_fit, y_fit)
    return float(roc_auc_score(y_held, model.predict_proba(x_held)[:, 1]))


def generator_figures(schema, encoder, rows, total, train, test, real_score, train_keys, train_matrix, seed,
                      fidelity=None) -> dict:
    """`fidelity`: (rows, real reference) for the fidelity figures (default: these rows against the training split)."""
    if not rows:
        return {"syn": None, "real": round(real_score, 4), "ratio": 0.0, "valid_share": 0.0, "copy_share": 0.0,
                "dcr_median": None, "rows": 0, "detection_auc": None, "wasserstein_mean": None, "tv_mean": None,
                "columns": {}}
    syn = score(schema, encoder, rows, test, seed)
    copies = sum(json.dumps(r, sort_keys=True, default=str) in train_keys for r in rows)
    matrix = encoder.distance_matrix(rows[:500])
    squared = (matrix ** 2).sum(1)[:, None] + (train_matrix ** 2).sum(1)[None, :] - 2 * matrix @ train_matrix.T
    nearest = np.sqrt(np.clip(squared.min(axis=1), 0, None))
    fidelity_rows, reference = fidelity or (rows, train)
    auc = detection_auc(schema, encoder, reference, fidelity_rows, seed)
    columns = column_distances(schema, reference, fidelity_rows)
    numeric = [d for c, d in columns.items() if not is_categorical(schema, c) and d is not None]
    categorical = [d for c, d in columns.items() if is_categorical(schema, c)]
    return {"syn": round(syn, 4), "real": round(real_score, 4), "ratio": round(syn / real_score, 4) if real_score else None,
            "valid_share": round(len(rows) / max(total, 1), 4), "copy_share": round(copies / len(rows), 4),
            "dcr_median": round(float(np.median(nearest)), 4), "rows": len(rows),
            "detection_auc": None if auc is None else round(auc, 4),
            "wasserstein_mean": round(float(np.mean(numeric)), 4) if numeric else None,
            "tv_mean": round(float(np.mean(categorical)), 4) if categorical else None, "columns": columns}


def evaluate(schema: Schema, rows: list[dict], split: dict, synthetic: dict[str, tuple[list[dict], int]],
             n_rows: int, seed: int = 0) -> dict:
    train, test = [rows[i] for i in split["train"]], [rows[i] for i in split["test"]]
    encoder = Encoder(schema, train)
    real_score = score(schema, encoder, train, test, seed)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(train), size=min(n_rows, len(train)), replace=False)
    real_sample = [train[i] for i in drawn]
    drawn_set = set(drawn.tolist())
    not_drawn = [r for i, r in enumerate(train) if i not in drawn_set]
    # real's fidelity: against the training rows it did not draw; where it drew (nearly) all of them (a small table),
    # one random half of the training split against the other
    halves = rng.permutation(len(train))
    real_fidelity = ((real_sample, not_drawn) if len(not_drawn) >= len(real_sample) // 2 else
                     ([train[i] for i in halves[:len(train) // 2]], [train[i] for i in halves[len(train) // 2:]]))
    generators = {"real": (real_sample, len(real_sample)), "naive": (naive_rows(schema, train, n_rows, seed), n_rows),
                  **synthetic}
    train_keys = {json.dumps(r, sort_keys=True, default=str) for r in train}
    train_matrix = encoder.distance_matrix(train)
    results = {name: generator_figures(schema, encoder, gen_rows, total, train, test, real_score, train_keys,
                                       train_matrix, seed, fidelity=real_fidelity if name == "real" else None)
               for name, (gen_rows, total) in generators.items()}
    few = max((len(gen_rows) for gen_rows, _ in synthetic.values()), default=0)
    if 0 < few < min(n_rows, len(train)):
        results.update(same_size_baselines(schema, encoder, train, test, real_score, few, seed))
    return results


def same_size_baselines(schema: Schema, encoder: Encoder, train: list[dict], test: list[dict], real_score: float,
                        n: int, seed: int, draws: int = SAME_SIZE_DRAWS) -> dict:
    """real@n and naive@n: ML efficiency of n real rows and of n naive rows, n the synthetic generators' row count.
    A booster fitted on a few dozen rows scores far below one fitted on hundreds, whatever wrote them (abalone, 64
    rows, three draws: real 0.46-0.64 of the full split, naive 0.04-0.40), so a generator is compared with the
    baselines at its own size; the mean over `draws` draws, with its standard deviation."""
    out = {}
    for name in ("real", "naive"):
        ratios = []
        for draw in range(draws):
            rng = np.random.default_rng([seed, draw])
            rows = ([train[i] for i in rng.choice(len(train), size=n, replace=False)] if name == "real" else
                    naive_rows(schema, train, n, int(rng.integers(2 ** 31))))
            ratios.append(score(schema, encoder, rows, test, seed) / real_score if real_score else 0.0)
        out[f"{name}@{n}"] = {"syn": round(float(np.mean(ratios)) * real_score, 4), "real": round(real_score, 4),
                              "ratio": round(float(np.mean(ratios)), 4), "ratio_std": round(float(np.std(ratios)), 4),
                              "rows": n, "draws": draws}  # ML efficiency only: no fidelity figures of its own
    return out


def table(results: dict) -> str:
    lines = ["| data set | generator | syn | real | ratio | valid | copies | DCR median | detection AUC | W1/std mean "
             "| TV mean |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    columns = ("syn", "real", "ratio", "valid_share", "copy_share", "dcr_median", "detection_auc", "wasserstein_mean",
               "tv_mean")
    for dataset, gens in results.items():
        # blank where a generator has no such figure: the same-size baselines (real@M, naive@M) have ML efficiency
        # only, and reports written before the fidelity figures existed lack those
        for name, f in gens.items():
            cells = [str(f[c]) if c in f else "" for c in columns]
            if "ratio_std" in f:
                cells[2] += f" +- {f['ratio_std']}"
            lines.append(f"| {dataset} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m step0_coldstart.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    _, opts = parse_config(parser, EvaluateOptions)
    require(opts, "dataset")
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
