"""The med data set (UCI heart disease, four sites): the derived target, missing markers, schema checks, site split."""

import collections
import hashlib
import json
import os

import pytest

from conftest import ROOT, run_cli
from step0_coldstart.sft_federated import federated_records, site_split
from step0_coldstart.tabular import load_rows, load_schema, splits

MED = os.path.join(ROOT, "configs/tabular/med.yaml")
SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


def test_the_csv_is_the_shared_file_byte_for_byte():
    with open(os.path.join(ROOT, "data/tabular/heart_disease_uci.csv"), "rb") as f:
        data = f.read()
    assert hashlib.md5(data).hexdigest() == "bde77728726675cb665f948df8ade988" and len(data) == 79346


def test_med_rows_target_and_missing_markers():
    schema = load_schema(MED)
    rows = load_rows(schema)
    assert len(rows) == 920 and "id" not in schema.columns and "num" not in schema.columns
    assert schema.target == "heartdiseaseStatus" and schema.site_column == "dataset"
    status = collections.Counter(r["heartdiseaseStatus"] for r in rows)
    assert status == {"heartdisease": 509, "healthy": 411}  # num 1-4 vs num 0: 55% positive
    assert collections.Counter(r["dataset"] for r in rows) == dict(zip(SITES, (304, 293, 123, 200)))
    assert sum(r["chol"] is None for r in rows) == 30 + 172 and all(r["chol"] != 0 for r in rows)  # empty or 0
    assert schema.categories["fbs"] == schema.categories["exang"] == ["FALSE", "TRUE"]
    assert isinstance(rows[0]["age"], int) and isinstance(rows[0]["oldpeak"], float)
    assert rows[0]["heartdiseaseStatus"] == "healthy" and rows[1]["heartdiseaseStatus"] == "heartdisease"  # num 0, 2


def write_table(tmp_path, yaml_body: str, csv_text: str = "id,x,num\n1,0.5,0\n2,1.5,3\n3,,1\n") -> str:
    (tmp_path / "t.csv").write_text(csv_text)
    (tmp_path / "t.yaml").write_text(f"name: t\ncsv: {tmp_path / 't.csv'}\n" + yaml_body)
    return str(tmp_path / "t.yaml")


def test_derive_and_missing_by_hand(tmp_path):
    path = write_table(tmp_path, "target: y\ntask: classification\nmissing: {x: [1.5]}\n"
                                 "derive: {y: {from: num, map: {'0': 'no', '3': 'yes'}, default: other}}\n"
                                 "columns: {x: float, y: category}\n")
    rows = load_rows(load_schema(path))
    assert rows == [{"x": 0.5, "y": "no"}, {"x": None, "y": "yes"}, {"x": None, "y": "other"}]
    no_default = write_table(tmp_path, "target: y\ntask: classification\nderive: {y: {from: num, map: {'0': a}}}\n"
                                       "columns: {x: float, y: category}\n")
    with pytest.raises(ValueError, match=r"t.csv:3: num='3' is not in derive.y.map of .*t.yaml"):
        load_rows(load_schema(no_default))


@pytest.mark.parametrize("body, message", [
    ("derive: {y: {from: num, mapping: {}}}\n", "t.yaml: derive.y: unknown keys ['mapping']"),
    ("derive: {y: {map: {'0': a}}}\n", "t.yaml: derive.y: 'from' must name the CSV column"),
    ("derive: {y: {from: num}}\n", "t.yaml: derive.y: give 'map', 'default' or both"),
    ("derive: {z: {from: num, default: a}}\n", "t.yaml: derive.z: declare the derived column in columns"),
    ("derive: [y]\n", "t.yaml: derive must map each new column"),
    ("derive: {y: {from: num, map: {'0': no}}}\n", "t.yaml: derive.y: 'map' must map source texts to plain values"),
    ("missing: {chol: [0]}\n", "t.yaml: missing.chol: not a declared column"),
    ("missing: {x: 0}\n", "t.yaml: missing.x: expected a list of plain values"),
    ("site_column: y\n", "t.yaml: site_column 'y' is not among the feature columns"),
])
def test_bad_derive_missing_and_site_keys_name_the_file_and_key(tmp_path, body, message):
    path = write_table(tmp_path, "target: y\ntask: classification\ncolumns: {x: float, y: category}\n" + body)
    with pytest.raises(ValueError) as err:
        load_schema(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_column_the_csv_lacks_is_one_line_naming_file_and_column(tmp_path):
    path = write_table(tmp_path, "target: num\ntask: regression\ncolumns: {x: float, chol: float, num: int}\n")
    result = run_cli("-m", "step0_coldstart.evaluate", "--dataset", path, "--splits_dir", str(tmp_path / "splits"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"t.csv: no column 'chol' (declared in {path})" in lines[0]
    derived = write_table(tmp_path, "target: y\ntask: classification\nderive: {y: {from: status, default: a}}\n"
                                    "columns: {x: float, y: category}\n")  # a derive source the CSV lacks
    with pytest.raises(ValueError, match=r"t.csv: no column 'status' \(declared in .*t.yaml\)"):
        load_rows(load_schema(derived))


def test_site_split_by_hand():
    sites = ["b", "a", "c", "a", None, "b"]
    assert site_split(sites, ["a", "b", "c"]) == [[1, 3], [0, 5], [2]]


def test_site_split_cli_gives_each_client_exactly_its_sites_rows(tmp_path):
    out, splits_dir = tmp_path / "fed", tmp_path / "splits"
    result = run_cli("-m", "step0_coldstart.sft_federated", "--dataset", MED, "--split_method", "site",
                     "--output_dir", str(out), "--splits_dir", str(splits_dir))
    assert result.returncode == 0, result.stderr
    schema = load_schema(MED)
    rows = load_rows(schema)
    train = [rows[i] for i in splits(schema, len(rows), str(splits_dir))["train"]]
    for i, site in enumerate(SITES):  # sorted order of the site values
        written = [json.loads(line) for line in open(out / f"med_client_{i}.train.jsonl")]
        assert written == federated_records(schema, [r for r in train if r["dataset"] == site])
        assert written and all(f"dataset: {site}," in r["input"] for r in written)
    assert not (out / "med_client_4.train.jsonl").exists()
    wrong = run_cli("-m", "step0_coldstart.sft_federated", "--dataset", MED, "--split_method", "site", "--num_client",
                    "3", "--output_dir", str(tmp_path / "fed3"), "--splits_dir", str(splits_dir))
    assert wrong.returncode == 2 and "--num_client 3: " in wrong.stderr and "has 4 sites in dataset" in wrong.stderr
    abalone = run_cli("-m", "step0_coldstart.sft_federated", "--dataset", f"{ROOT}/configs/tabular/abalone.yaml",
                      "--split_method", "site", "--output_dir", str(tmp_path / "fedA"), "--splits_dir", str(splits_dir))
    assert abalone.returncode == 2 and "needs --site_column or the YAML's site_column" in abalone.stderr


def test_leave_one_out_builds_one_round_driver_command_per_held_out_set(tmp_path):
    from dataclasses import fields
    from step0_coldstart.leave_one_out import combine, fold_plan, load_config
    from step0_coldstart.rounds import RoundsConfig
    DEFAULTS = {f.name for f in fields(RoundsConfig)}
    cfg, shared = load_config(os.path.join(ROOT, "configs/synfed_loo.yaml"))
    folds = fold_plan(cfg, shared, "runs/loo", ckpt_dir="ckpt/smol", tokenizer_path="ckpt/smol")
    names = ["abalone", "adult", "buddy", "california", "med"]
    assert [f["name"] for f in folds] == names
    yamls = {n: f"configs/tabular/{n}.yaml" for n in names}
    for fold in folds:
        name, config = fold["name"], fold["config"]
        assert config["heldout"] == yamls[name]
        assert config["datasets"] == [yamls[n] for n in names if n not in (name, "med")]  # med never in SFT
        assert set(config) <= set(DEFAULTS) and config["tokenizer_path"] == "ckpt/smol"  # rounds.py takes it
        assert fold["cmd"] == ["-m", "step0_coldstart.rounds", "--config", f"runs/loo/{name}/fold.yaml", "--workdir",
                               f"runs/loo/{name}", "--rounds", "1", "--ckpt_dir", "ckpt/smol"]
        assert config.get("fed_split_method", "none") == ("site" if name == "med" else "none")
    for fold, figures in zip(folds[:2], ({"ratio": 0.9}, {"ratio": 0.5})):  # two finished folds' reports
        fold["dir"] = str(tmp_path / fold["name"])
        os.makedirs(fold["dir"])
        json.dump({fold["name"]: {"naive": {**dict.fromkeys(("syn", "real", "valid_share", "copy_share", "dcr_median")),
                                            **figures}}}, open(os.path.join(fold["dir"], "report.json"), "w"))
    results, markdown = combine(folds[:2])
    assert sorted(results) == ["abalone", "adult"]
    assert results["abalone"]["naive"]["ratio"] == 0.9 and results["adult"]["naive"]["ratio"] == 0.5
    assert "| abalone | naive |" in markdown and "- adult held out; SFT on abalone, buddy, california" in markdown


@pytest.mark.parametrize("body, message", [
    ("datasets: [a.yaml, b.yaml]\nheldout: a.yaml\n", "heldout is set per fold"),
    ("datasets: [a.yaml, b.yaml]\nnever_sft: [c.yaml]\n", "never_sft names 'c.yaml'"),
    ("datasets: [a.yaml, b.yaml]\nsft_epoch: 2\n", "unknown keys ['sft_epoch']"),
    ("datasets: [a.yaml]\n", "at least two distinct"),
])
def test_bad_leave_one_out_configs_name_the_file(tmp_path, body, message):
    from step0_coldstart.leave_one_out import load_config
    (tmp_path / "loo.yaml").write_text(body)
    with pytest.raises(ValueError) as err:
        load_config(str(tmp_path / "loo.yaml"))
    assert f"{tmp_path / 'loo.yaml'}: " in str(err.value) and message in str(err.value)


def test_leave_one_out_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "loo.yaml").write_text("datasets: [a.yaml, b.yaml]\nheldout: a.yaml\n")
    result = run_cli("-m", "step0_coldstart.leave_one_out", "--config", str(tmp_path / "loo.yaml"), "--dry_run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "loo.yaml: heldout is set per fold" in lines[0]
