"""Tabular data sets: YAML schemas, typed rows, persisted splits, strict serialisation and the tolerant parser."""

import json
import os
import random

import numpy as np
import pytest

from conftest import ROOT
from step0_coldstart.tabular import (CONVERSION_ERROR, INVALID_ANSWER, MISSING_KEY, REDUNDANT_KEY, SUCCESS,
                                     load_rows, load_schema, parse_row, row_to_text, splits)

DATASETS = ["abalone", "adult", "buddy", "california"]


@pytest.fixture(scope="module")
def loaded():
    out = {}
    for name in DATASETS:
        schema = load_schema(os.path.join(ROOT, "configs/tabular", f"{name}.yaml"))
        out[name] = (schema, load_rows(schema))
    return out


def rounded(row, schema):
    return {c: round(v, schema.float_precision) if isinstance(v, float) else v for c, v in row.items()}


@pytest.mark.parametrize("name", DATASETS)
def test_round_trip_on_every_shipped_data_set(loaded, name):
    schema, rows = loaded[name]
    assert len(rows) > 4000 and set(rows[0]) == set(schema.columns)
    for row in random.Random(0).sample(rows, 300):
        text = row_to_text(row, schema)
        assert list(json.loads(text)) == list(schema.columns)  # strict JSON, column order
        status, parsed = parse_row(f"Here is a new sample:\n{text}\nThanks.", schema)
        assert status == SUCCESS and parsed == rounded(row, schema), text


def test_shipped_data_facts(loaded):
    adult, rows = loaded["adult"]
    assert len(rows) == 32561 and sum(r["workclass"] is None for r in rows) == 1836  # "?" is missing
    assert rows[0]["workclass"] == "State-gov"  # leading space stripped
    assert json.loads(row_to_text(rows[0], adult))["income"] == "no"
    buddy, rows = loaded["buddy"]
    assert "pet_id" not in rows[0] and {json.loads(row_to_text(r, buddy))["breed_category"] for r in rows} == {"A", "B", "C"}
    cal, rows = loaded["california"]
    assert sum(r["total_bedrooms"] is None for r in rows) == 207


def test_tolerant_parser_statuses(loaded):
    schema, _ = loaded["abalone"]
    good = {"Sex": "M", "Length": 0.455, "Diameter": 0.365, "Height": 0.095, "Whole.weight": 0.514,
            "Shucked.weight": 0.2245, "Viscera.weight": 0.101, "Shell.weight": 0.15, "Rings": 15}
    unquoted = "{\n\tsex: m,\n\tlength: 0.455, diameter: 0.365, height: 0.095, whole_weight: 0.514, " \
               "shucked weight: 0.2245, viscera/weight: 0.101, shell.weight: 0.15, rings: 15}"
    assert parse_row(unquoted, schema) == (SUCCESS, good)  # the reference's unquoted style, keys spelt loosely
    assert parse_row("I cannot do that.", schema)[0] == INVALID_ANSWER
    partial = {k: v for k, v in good.items() if k != "Height"}
    status, values = parse_row(json.dumps(partial), schema)
    assert status == MISSING_KEY and values["Height"] is None and values["Rings"] == 15
    assert parse_row(json.dumps({**good, "Colour": "red"}), schema) == (REDUNDANT_KEY, good)
    status, values = parse_row(json.dumps({**good, "Length": "long"}), schema)
    assert status == CONVERSION_ERROR and values["Length"] is None
    assert parse_row(json.dumps({**good, "Sex": "X"}), schema)[0] == CONVERSION_ERROR  # unknown category
    assert parse_row(json.dumps({**good, "Rings": 7.5}), schema)[0] == CONVERSION_ERROR  # not an integer
    adult, _ = loaded["adult"]
    assert parse_row('{"income": "maybe"}', adult)[0] == CONVERSION_ERROR


def test_splits_are_deterministic_and_persisted(loaded, tmp_path):
    schema, rows = loaded["abalone"]
    first = splits(schema, len(rows), str(tmp_path))
    assert sorted(first["train"] + first["val"] + first["test"]) == list(range(len(rows)))
    assert len(first["test"]) == round(0.2 * len(rows))
    os.remove(tmp_path / "abalone.split.json")
    assert splits(schema, len(rows), str(tmp_path)) == first  # the same seed gives the same split
    assert json.load(open(tmp_path / "abalone.split.json"))["splits"] == first
    with pytest.raises(ValueError, match="made for other rows"):
        splits(schema, len(rows) - 1, str(tmp_path))


def test_bad_yaml_and_csv_give_clear_errors(tmp_path):
    def write(text):
        path = tmp_path / "d.yaml"
        path.write_text(text)
        return str(path)

    with pytest.raises(ValueError, match="d.yaml: missing key 'target'"):
        load_schema(write("name: x\ncsv: x.csv\ntask: regression\ncolumns: {a: float}\n"))
    with pytest.raises(ValueError, match="column 'a' has type 'text'"):
        load_schema(write("name: x\ncsv: x.csv\ntarget: a\ntask: regression\ncolumns: {a: text}\n"))
    with pytest.raises(ValueError, match="target 'b' is not among the columns"):
        load_schema(write("name: x\ncsv: x.csv\ntarget: b\ntask: regression\ncolumns: {a: float}\n"))
    (tmp_path / "x.csv").write_text("a,b\n1.0,2\nfoo,3\n")
    schema = load_schema(write(f"name: x\ncsv: {tmp_path / 'x.csv'}\ntarget: b\ntask: regression\n"
                               "columns: {a: float, b: int}\n"))
    with pytest.raises(ValueError, match=r"x.csv:3: a='foo' is not a float"):
        load_rows(schema)
    schema.columns["c"] = "float"
    with pytest.raises(ValueError, match="x.csv: no column 'c'"):
        load_rows(schema)


def test_unreadable_yaml_and_csv_rows_give_clear_errors(loaded, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: data set YAML not found"):
        load_schema(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [x\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_schema(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        load_schema(str(tmp_path / "list.yaml"))
    from step0_coldstart.tabular import read_rows_csv
    schema, _ = loaded["abalone"]
    header = ",".join(schema.columns)
    (tmp_path / "rows.csv").write_text(f"{header}\nM,0.4,0.3,0.1,0.5,0.2,0.1,0.15,9\nF,,0.3,0.1,0.5,0.2,0.1,0.15,\n"
                                       f"M,abc,0.3,0.1,0.5,0.2,0.1,0.15,9\n")
    with pytest.raises(ValueError, match="rows.csv:4: not a row of abalone"):
        read_rows_csv(str(tmp_path / "rows.csv"), schema)
    (tmp_path / "rows.csv").write_text(f"{header}\nM,0.4,0.3,0.1,0.5,0.2,0.1,0.15,9\nF,,0.3,0.1,0.5,0.2,0.1,0.15,\n")
    rows = read_rows_csv(str(tmp_path / "rows.csv"), schema)
    assert rows[0]["Rings"] == 9 and rows[0]["Length"] == 0.4 and rows[1]["Length"] is None and rows[1]["Rings"] is None


def test_ml_efficiency_real_naive_and_a_synthetic_file(loaded, tmp_path):
    from step0_coldstart.evaluate import evaluate, synthetic_rows
    schema, rows = loaded["abalone"]
    split = splits(schema, len(rows), str(tmp_path))
    train = [rows[i] for i in split["train"]]
    copies = tmp_path / "copies.jsonl"  # a "generator" that copies training rows, with one broken output
    copies.write_text("".join(json.dumps({"text": row_to_text(r, schema)}) + "\n" for r in train[:300])
                      + json.dumps({"text": "no row here"}) + "\n")
    results = evaluate(schema, rows, split, {"copies": synthetic_rows(str(copies), schema)}, n_rows=300)
    real, naive, copied = results["real"], results["naive"], results["copies"]
    assert real["real"] == naive["real"] == copied["real"] > 0.4  # R2 of the full real training split
    assert naive["ratio"] < real["ratio"]  # abalone: independent columns lose most of the signal
    assert copied["valid_share"] == pytest.approx(300 / 301, abs=1e-4) and copied["rows"] == 300
    assert copied["copy_share"] == 1.0 and copied["dcr_median"] == pytest.approx(0.0, abs=1e-6)
    assert naive["copy_share"] < 0.05 and naive["dcr_median"] > 0.1
    assert not any("@" in name for name in results)  # the file holds n_rows rows: no same-size baselines
    # 300 synthetic rows against baselines of 1,000: real and naive are added at 300 rows (5 draws each). A
    # "generator" of 300 training rows drawn at random (the file's first 300 are a block of the CSV's order, which
    # scores R2 < 0) falls within the spread of real@300's draws
    drawn = tmp_path / "drawn.jsonl"
    picked = np.random.default_rng(7).choice(len(train), size=300, replace=False)
    drawn.write_text("".join(json.dumps({"text": row_to_text(train[i], schema)}) + "\n" for i in picked))
    results = evaluate(schema, rows, split, {"copies": synthetic_rows(str(drawn), schema)}, n_rows=1000)
    small_real, small_naive = results["real@300"], results["naive@300"]
    assert small_real["rows"] == small_naive["rows"] == 300 and small_real["draws"] == 5
    assert small_real["ratio"] < results["real"]["ratio"]  # fewer real rows are worth less
    assert small_naive["ratio"] < small_real["ratio"]
    assert abs(results["copies"]["ratio"] - small_real["ratio"]) <= 3 * small_real["ratio_std"] + 0.02
    from step0_coldstart.evaluate import table  # the baselines' rows: mean +- std, no fidelity figures of their own
    row = next(line for line in table({"abalone": results}).splitlines() if "| real@300 |" in line)
    assert f"| {small_real['ratio']} +- {small_real['ratio_std']} |" in row and row.endswith("|  |  |  |  |  |  |")


def test_anchors_are_distinct_real_rows_of_the_scoring_split(loaded, tmp_path):
    from step0_coldstart.synscore_anchors import anchors
    schema, rows = loaded["adult"]
    split = splits(schema, len(rows), str(tmp_path))
    scoring = [rows[i] for i in split["val"]]
    chosen = anchors(schema, scoring, 12)
    assert len(chosen) == 12
    scoring_keys = {json.dumps(r, sort_keys=True) for r in scoring}
    keys = [json.dumps(r, sort_keys=True) for r in chosen]
    assert len(set(keys)) == 12 and all(k in scoring_keys for k in keys)
    test_keys = {json.dumps(rows[i], sort_keys=True) for i in split["test"]}
    assert not (set(keys) & test_keys - scoring_keys)  # nothing from the test split
    with pytest.raises(ValueError, match="num_clusters 100000 exceeds"):
        anchors(schema, scoring, 100000)


def test_similarity_selection_by_hand():
    import numpy as np
    from step0_coldstart.sft_generator import neighbours
    m = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    # cosine to row 0: row1 0.994, row4 0.707, row2 0, row3 -1
    assert neighbours(m, 0, 3) == [1, 4, 3]  # two most similar, then the least similar
    assert neighbours(m, 0, 4) == [1, 4, 3, 2]


def test_cold_start_prompts_fit_and_never_show_the_test_split(loaded, tokenizer, tmp_path):
    from step0_coldstart.sft_generator import dataset_prompts
    schema, rows = loaded["abalone"]
    split = splits(schema, len(rows), str(tmp_path))
    train = [rows[i] for i in split["train"]]
    records, report = dataset_prompts(schema, train, 40, 5, tokenizer, 1200, 0, with_answers=True)
    assert report["max_tokens"] <= 1200 and len(records) == 40
    test_texts = {row_to_text(rows[i], schema) for i in split["test"]} - {row_to_text(r, schema) for r in train}
    for record in records:
        assert not any(text in record["prompt"] or text in record["response"] for text in test_texts)
        assert parse_row(record["response"], schema)[0] == SUCCESS
    few, report = dataset_prompts(schema, train, 5, 5, tokenizer, 600, 0, with_answers=False)
    assert report["mean_examples"] < 5 and all("response" not in r for r in few)  # fewer rows to fit 600 tokens
    with pytest.raises(ValueError, match="even one in-context row"):
        dataset_prompts(schema, train, 1, 5, tokenizer, 100, 0, with_answers=False)


def test_heldout_prompts_take_their_own_number_of_rows(tmp_path, monkeypatch):
    """--heldout_examples sets the held-out prompts' in-context rows, --num_examples the SFT prompts' (and the held-out
    ones' where it is not given); every held-out prompt shows exactly the rows its `context` lists."""
    import sys
    from step0_coldstart import sft_generator
    from conftest import TOK512

    def run(out, *extra):
        monkeypatch.setattr(sys, "argv", [
            "sft_generator", "--datasets", os.path.join(ROOT, "configs/tabular/buddy.yaml"), "--heldout",
            os.path.join(ROOT, "configs/tabular/abalone.yaml"), "--tokenizer_path", TOK512, "--output_dir", str(out),
            "--splits_dir", str(tmp_path / "splits"), "--prompts_per_dataset", "3", "--heldout_prompts", "4",
            "--num_examples", "2", "--max_seq_len", "4096", *extra])
        sft_generator.main()
        with open(out / "lengths.json") as f:
            lengths = json.load(f)
        with open(out / "abalone_prompts.jsonl") as f:
            held = [json.loads(line) for line in f]
        return lengths, held

    lengths, held = run(tmp_path / "six", "--heldout_examples", "6")
    assert lengths["buddy"]["min_examples"] == lengths["buddy"]["mean_examples"] == 2
    assert lengths["abalone"]["min_examples"] == lengths["abalone"]["mean_examples"] == 6
    for record in held:
        assert len(record["context"]) == 6 and record["prompt"].startswith("Here are six entries")
        assert record["prompt"].count("\nsample ") == 6
    lengths, held = run(tmp_path / "default")
    assert lengths["abalone"]["mean_examples"] == 2 and all(len(r["context"]) == 2 for r in held)


def test_preference_pairs_follow_the_reference_rules():
    from step0_coldstart.convert_score_to_prefer import preference_pairs

    def sample(name, status, gain, group="g1"):
        return {"syn_pmt_id": group, "prompt": "P", "answer": name, "status": status, "gain_score": gain,
                "status_score": {SUCCESS: 5, MISSING_KEY: 2, INVALID_ANSWER: 0}[status]}

    records = [sample("A", SUCCESS, 0.2), sample("B", SUCCESS, 0.5), sample("C", MISSING_KEY, None),
               sample("D", INVALID_ANSWER, None), sample("E", SUCCESS, 0.2),  # E ties with A: skipped
               sample("X", MISSING_KEY, None, "g2"), sample("Y", INVALID_ANSWER, None, "g2")]  # no SUCCESS in g2
    pairs = preference_pairs(records)
    got = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    assert got == sorted([("B", "A"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D"),
                          ("B", "E"), ("E", "C"), ("E", "D")])
    assert all(p["prompt"] == [{"role": "user", "content": "P"}] for p in pairs)
    assert len(preference_pairs(records, max_pairs=4)) == 4
