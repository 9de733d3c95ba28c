"""SynFed round pieces: federated files, task questions, contrast rows, the scorer back-ends, guided sampling."""

import json
import os
import re

import pytest
from sklearn.cluster import KMeans

from conftest import ROOT, TOK512, run_cli, run_clis
from step0_coldstart.tabular import Encoder
from step0_coldstart.scorers import (LLMBackend, SklearnBackend, anchor_score, baseline, contrast_rows,
                                     extract_answer, gain, scoring_prompts)
from step0_coldstart.sft_federated import client_split
from step0_coldstart.tabular import (SUCCESS, features_text, load_rows, load_schema, parse_row,
                                     target_bins, task_question)


def tiny_schema(tmp_path, task="regression"):
    (tmp_path / "t.csv").write_text("x,y\n" + "".join(f"{i},{i % 2 if task == 'classification' else i}\n"
                                                      for i in range(20)))
    target = "y: category" if task == "classification" else "y: float"
    labels = 'labels: {"0": "no", "1": "yes"}\n' if task == "classification" else ""
    (tmp_path / "t.yaml").write_text(f"name: t\ncsv: {tmp_path / 't.csv'}\ntarget: y\ntask: {task}\n{labels}"
                                     f"columns: {{x: float, {target}}}\n")
    schema = load_schema(str(tmp_path / "t.yaml"))
    return schema, load_rows(schema)


def test_task_question_and_features_text():
    schema = load_schema(os.path.join(ROOT, "configs/tabular/adult.yaml"))
    rows = load_rows(schema)
    row = dict(rows[0], workclass=None)
    text = features_text(row, schema)
    assert text.startswith(" age: 39, workclass: norecord, fnlwgt: 77516, education: Bachelors,")
    assert text.endswith("native-country: United-States ") and "income" not in text
    assert task_question(schema, row) == (
        "Determine whether a person earns over $50K per year based on the personal attributes provided in the text "
        f"below. Directly respond with only either 'yes' or 'no'. \nText: {text}. \nAnswer: ")


def test_regression_targets_binned_into_quantiles(tmp_path):
    schema, rows = tiny_schema(tmp_path)
    bins = target_bins(schema, rows, 4)
    assert [bins.count(f"bin{b}") for b in range(4)] == [5, 5, 5, 5]
    assert bins[:5] == ["bin0"] * 5 and bins[-5:] == ["bin3"] * 5


def test_client_splits():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    assert client_split(labels, 3, "none") == [list(range(100))] * 3
    clients = client_split(labels, 4, "dirichlet", alpha=0.5, seed=1)
    assert sorted(i for c in clients for i in c) == list(range(100))  # a partition
    assert clients == client_split(labels, 4, "dirichlet", alpha=0.5, seed=1)
    # label skew: with a small alpha a client's label mix is far from the global 60/30/10; with a huge one it is close
    def skew(cs):
        return max(abs(sum(labels[i] == "a" for i in c) / len(c) - 0.6) for c in cs if len(c) >= 10)
    assert skew(client_split(labels, 4, "dirichlet", alpha=0.05, seed=3)) > 0.25
    assert skew(client_split(labels, 2, "dirichlet", alpha=1e6, seed=3)) < 0.05


def test_federated_cli_writes_clients_and_refuses_to_overwrite(tmp_path):
    out, splits = tmp_path / "fed", tmp_path / "splits"
    args = ("-m", "step0_coldstart.sft_federated", "--dataset", f"{ROOT}/configs/tabular/abalone.yaml", "--num_client",
            "3", "--split_method", "dirichlet", "--output_dir", str(out), "--splits_dir", str(splits))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for i in range(3) for line in open(out / f"abalone_client_{i}.train.jsonl")]
    split = json.load(open(splits / "abalone.split.json"))["splits"]
    assert len(records) == len(split["train"])
    first = records[0]
    assert first["input"].startswith("Estimate the number of rings") and re.fullmatch(r"\d+", first["output"])
    again = run_cli(*args)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_contrast_rows_come_from_other_clusters_with_other_labels(tmp_path):
    schema = load_schema(os.path.join(ROOT, "configs/tabular/buddy.yaml"))
    rows = load_rows(schema)
    train, anchors = rows[:600], rows[600:610]
    contrasts = contrast_rows(schema, train, anchors, num_clusters=4, seed=0)
    assert len(contrasts) == 10 and all(1 <= len(c) <= 3 for c in contrasts)
    # the clusters, recomputed: the reference's KMeans(4) over standardised / one-hot training rows
    encoder = Encoder(schema, train)
    kmeans = KMeans(n_clusters=4, random_state=0, n_init=4).fit(encoder.distance_matrix(train))
    cluster = {json.dumps(r, sort_keys=True): int(k) for r, k in zip(train, kmeans.labels_)}
    for anchor, contrast in zip(anchors, contrasts):
        assert all(c in train and c[schema.target] != anchor[schema.target] for c in contrast)
        clusters = [cluster[json.dumps(c, sort_keys=True)] for c in contrast]
        own = int(kmeans.predict(encoder.distance_matrix([anchor]))[0])
        assert len(set(clusters)) == len(clusters) and own not in clusters  # one per other cluster
    assert contrasts == contrast_rows(schema, train, anchors, num_clusters=4, seed=0)


def test_sklearn_backend_by_hand(tmp_path):
    schema, rows = tiny_schema(tmp_path)  # y = x; standardising one feature scales every distance alike
    anchors = [{"x": 10.0, "y": 10.0}, {"x": 11.0, "y": 11.0}, {"x": 0.5, "y": 0.5}]
    contrasts = [[{"x": 0.0, "y": 0.0}, {"x": 19.0, "y": 19.0}]] * 2 + [[{"x": 19.0, "y": 19.0}]]
    backend = SklearnBackend(schema, rows)

    def idw(x, points):  # inverse-distance-weighted mean of the examples' y
        weights = [1 / abs(x - px) for px, _ in points]
        return sum(w * py for w, (_, py) in zip(weights, points)) / sum(weights)

    def score(predictions):  # 1 - sum |error| / sum |truth - median 10|
        return 1 - sum(abs(p - a["y"]) for p, a in zip(predictions, anchors)) / (0 + 1 + 9.5)

    pairs = [[(0, 0), (19, 19)], [(0, 0), (19, 19)], [(19, 19)]]
    ds0 = baseline(backend, schema, anchors, contrasts)
    assert idw(10, pairs[0]) == pytest.approx(10) and idw(11, pairs[1]) == pytest.approx(11)  # exact on a line
    assert ds0["score"] == pytest.approx(score([10, 11, 19])) and ds0["missing"] == 0
    for row in ({"x": 10.5, "y": 10.5}, {"x": 10.5, "y": -30.0}, {"x": 1.0, "y": 1.0}):
        result = gain(backend, schema, anchors, contrasts, row, ds0)
        expected = score([idw(a["x"], [(row["x"], row["y"])] + p) for a, p in zip(anchors, pairs)])
        assert result["ds1"]["score"] == pytest.approx(expected)
        assert result["gain_score"] == pytest.approx(expected - ds0["score"])
    helpful = gain(backend, schema, anchors, contrasts, {"x": 1.0, "y": 1.0}, ds0)["gain_score"]
    harmful = gain(backend, schema, anchors, contrasts, {"x": 10.5, "y": -30.0}, ds0)["gain_score"]
    assert helpful > 0 > harmful


def test_sklearn_backend_classification_scores_the_gold_labels_probability_by_hand(tmp_path):
    schema, rows = tiny_schema(tmp_path, "classification")  # one feature: standardising scales every distance alike
    anchors = [{"x": 1.0, "y": "1"}, {"x": 2.0, "y": "0"}]
    contrasts = [[{"x": 4.0, "y": "0"}], [{"x": 6.0, "y": "1"}]]  # the other label, as on a binary target
    backend = SklearnBackend(schema, rows)
    ds0 = baseline(backend, schema, anchors, contrasts)
    assert ds0 == {"pairs": 2, "missing": 0.0, "score": 0.0}  # no example carries either anchor's label
    # weights 1 / distance: a "yes" at 1.5 is 0.5 from anchor 1 (weight 2) against its contrast's 3 (weight 1/3):
    # P(yes) = 2 / (2 + 1/3) = 6/7; anchor 2's examples are both "yes": P(no) = 0
    assert gain(backend, schema, anchors, contrasts, {"x": 1.5, "y": "1"}, ds0)["gain_score"] == pytest.approx(3 / 7)
    # a "no" at 1.5: anchor 1 gets 0; anchor 2 weight 2 against its contrast's 1/4: P(no) = 8/9
    assert gain(backend, schema, anchors, contrasts, {"x": 1.5, "y": "0"}, ds0)["gain_score"] == pytest.approx(4 / 9)
    # far from every anchor, a row still gains a little (continuous), where a hard prediction would not move:
    # anchor 1: (1/99) / (1/99 + 1/3) = 1/34, anchor 2: 0
    far = {"x": 100.0, "y": "1"}
    assert backend.predict(schema, anchors, contrasts, far) == backend.predict(schema, anchors, contrasts, None)
    assert gain(backend, schema, anchors, contrasts, far, ds0)["gain_score"] == pytest.approx(1 / 68)


def test_llm_backend_with_a_scripted_model(tmp_path):
    schema, rows = tiny_schema(tmp_path, "classification")
    anchors = [{"x": 1.0, "y": "1"}, {"x": 2.0, "y": "0"}, {"x": 3.0, "y": "1"}]
    contrasts = [[{"x": 4.0, "y": "0"}], [{"x": 5.0, "y": "1"}], [{"x": 6.0, "y": "0"}]]
    seen = []

    def first_example_label(questions):  # a "model" that answers the label of the first solved example
        seen.extend(questions)
        return [re.search(r"Answer: (\w+) \n\n", q).group(1) for q in questions]

    backend = LLMBackend(first_example_label)
    ds0 = baseline(backend, schema, anchors, contrasts)
    assert ds0 == {"pairs": 3, "missing": 0.0, "score": 0.0}  # contrasts always carry the other label
    result = gain(backend, schema, anchors, contrasts, {"x": 1.5, "y": "1"}, ds0)
    # every anchor predicted "yes": F1(yes) = 2 * (2/3 * 1) / (2/3 + 1) = 0.8, F1(no) = 0 -> macro 0.4
    assert result["ds1"]["score"] == pytest.approx(0.4) and result["gain_score"] == pytest.approx(0.4)
    ds1_prompts = scoring_prompts(schema, anchors, contrasts, {"x": 1.5, "y": "1"})
    assert seen[-3:] == [p["question"] for p in ds1_prompts]
    assert ds1_prompts[0]["question"].startswith(task_question(schema, {"x": 1.5}) + "yes \n\n")
    assert ds1_prompts[1]["gold"] == "no"
    silent = anchor_score(schema, ["yes", "no"], [None, None])
    assert silent["missing"] == 1.0 and silent["score"] == 0.0


def test_answer_extraction(tmp_path):
    classification, _ = tiny_schema(tmp_path, "classification")
    assert extract_answer(classification, "Yes.") == "yes"
    assert extract_answer(classification, "yes or no") is None  # two labels
    assert extract_answer(classification, "yesterday") is None  # whole words only
    (tmp_path / "r").mkdir()
    regression, _ = tiny_schema(tmp_path / "r", "regression")
    assert extract_answer(regression, " 1,234.5\nbecause") == "1234.5"
    assert extract_answer(regression, "about 12") is None
    # a missing answer counts as the median 3: errors 2 + 0 + 0 against |truth - 3| = 2 + 0 + 2
    median_fallback = anchor_score(regression, ["1", "3", "5"], [None, "3", "5"])
    assert median_fallback["score"] == pytest.approx(0.5) and median_fallback["missing"] == pytest.approx(1 / 3)


def test_guided_sampling_writes_every_key_of_an_unseen_table(stories_dir, world1):
    from llama_mp.checkpoint import load_model
    from llama_mp.sampler import Sampler
    from llama_mp.tokenizer import Tokenizer
    from step0_coldstart.syn_addprompt import SynConfig, guided_rows
    schema = load_schema(os.path.join(ROOT, "configs/tabular/abalone.yaml"))
    load_rows(schema)
    sampler = Sampler(load_model(stories_dir, 1, 0, 512), Tokenizer(TOK512), max_batch_size=4)
    categories = {"Sex": ["F", "M"]}  # as if "I" were never seen in training rows: it must never be written
    answers = guided_rows(sampler, schema, ["Once upon a time", "Rows:"], [1, 2], SynConfig(max_value_tokens=6),
                          categories)
    for answer in answers:
        keys = re.findall(r'"([^"]+)": ', answer[answer.index("{"):])
        assert keys[:len(schema.columns)] == list(schema.columns)
        status, row = parse_row(answer, schema)
        assert status == SUCCESS  # keys never missing, values always of their type
        assert row["Sex"] in ("F", "M")  # categories are chosen among the given ones
        numbers = re.findall(r'": ([^,}]*)', answer)[1:]
        assert all(re.fullmatch(r"-?\d+(\.\d+)?|null", v) for v in numbers), answer
        assert re.fullmatch(r"-?\d+|null", numbers[-1])  # Rings is an int


def test_syn_addscore_llm_backend_end_to_end(stories_dir, tmp_path):
    schema = load_schema(os.path.join(ROOT, "configs/tabular/abalone.yaml"))
    rows = load_rows(schema)
    anchors, contrasts = rows[:2], [[rows[2]], [rows[3]]]
    with open(tmp_path / "abalone.contrast.jsonl", "w") as f:
        f.writelines(json.dumps({"anchor": a, "contrast": c}) + "\n" for a, c in zip(anchors, contrasts))
    samples = [{"syn_pmt_id": "p", "syn_id": f"p-{i}", "prompt": "P", "answer": "A", "status": status, "result": row}
               for i, (status, row) in enumerate([(SUCCESS, rows[10]), (SUCCESS, rows[11]),
                                                  ("INVALID_ANSWER", {c: None for c in schema.columns})])]
    with open(tmp_path / "abalone.raw.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    out = tmp_path / "abalone.score.jsonl"
    args = ("-m", "step0_coldstart.syn_addscore", "--dataset", f"{ROOT}/configs/tabular/abalone.yaml", "--raw_file",
            str(tmp_path / "abalone.raw.jsonl"), "--output_file", str(out), "--backend", "llm", "--ckpt_dir",
            stories_dir, "--tokenizer_path", TOK512, "--max_seq_len", "1024", "--max_gen_len", "8",
            "--splits_dir", str(tmp_path / "splits"))
    result = run_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in open(out)]
    answers = [json.loads(line) for line in open(str(out) + ".answers.jsonl")]
    assert len(answers) == 2 + 2 * 2  # each distinct question once: ds0 per anchor, ds1 per anchor and sample
    for record in scored[:2]:
        assert record["ds0"]["pairs"] == record["ds1"]["pairs"] == 2
        assert record["gain_score"] == pytest.approx(record["ds1"]["score"] - record["ds0"]["score"])
        assert record["status_score"] == 5
    assert scored[2]["gain_score"] is None and scored[2]["status_score"] == 0
    again = run_cli(*args)
    assert again.returncode != 0 and "already exists" in again.stderr
    # killed after the answers were merged but before the scores were written: the rerun reuses the answers
    first = open(out).read()
    os.remove(out)
    resumed = run_cli(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert open(out).read() == first


def test_a_row_without_a_target_gains_nothing(tmp_path):
    schema, rows = tiny_schema(tmp_path)
    anchors, contrasts = [{"x": 10.0, "y": 10.0}], [[{"x": 0.0, "y": 0.0}]]
    backend = SklearnBackend(schema, rows)
    ds0 = baseline(backend, schema, anchors, contrasts)
    assert gain(backend, schema, anchors, contrasts, {"x": 10.0, "y": None}, ds0)["gain_score"] == 0.0
    assert scoring_prompts(schema, anchors, contrasts, {"x": 10.0, "y": None}) == scoring_prompts(schema, anchors,
                                                                                                  contrasts)


def test_bad_round_inputs_fail_with_one_line(tmp_path):
    abalone = f"{ROOT}/configs/tabular/abalone.yaml"
    raw = tmp_path / "abalone.raw.jsonl"
    raw.write_text('{"syn_id": "a", "status": "SUCCESS"}\n')
    checks = [
        (("-m", "step0_coldstart.convert_raw_to_csv", "--dataset", abalone, "--raw_file", str(raw), "--output_file",
          str(tmp_path / "out.csv")), "abalone.raw.jsonl:1: a raw sample needs"),
        (("-m", "step0_coldstart.syn_addscore", "--dataset", abalone, "--raw_file", str(raw), "--output_file",
          str(tmp_path / "score.jsonl"), "--splits_dir", str(tmp_path / "splits")), "abalone.contrast.jsonl"),
        (("-m", "step0_coldstart.syn_addscore", "--dataset", abalone, "--raw_file", str(raw), "--output_file",
          str(tmp_path / "score3.jsonl"), "--splits_dir", str(tmp_path / "splits3"), "--backend", "llm"),
         "--backend llm needs --ckpt_dir"),
    ]
    contrast = tmp_path / "abalone.contrast.jsonl"
    contrast.write_text(json.dumps({"anchor": {"Sex": "M", "Length": 0.4, "Rings": None}, "contrast": []}) + "\n")
    checks.append((("-m", "step0_coldstart.syn_addscore", "--dataset", abalone, "--raw_file", str(raw), "--output_file",
                    str(tmp_path / "score4.jsonl"), "--splits_dir", str(tmp_path / "splits4"), "--contrast_file",
                    str(contrast)),
                   "abalone.contrast.jsonl:1: the row has no Rings"))
    bad_csv = tmp_path / "syn.csv"
    bad_csv.write_text("Sex,Length\nM,0.4\n")
    checks.append((("-m", "step0_coldstart.sft_federated", "--dataset", abalone, "--input_file", str(bad_csv),
                    "--output_dir", str(tmp_path / "fed"), "--splits_dir", str(tmp_path / "fed_splits")),
                   "syn.csv:2: not a row of abalone"))
    bad_config = tmp_path / "syn.yaml"
    bad_config.write_text("num_repeats: 3\n")
    checks.append((("-m", "step0_coldstart.syn_addprompt", "--dataset", abalone, "--ckpt_dir", "x", "--tokenizer_path",
                    TOK512, "--prompt_file", str(raw), "--anchor_file", "a.csv", "--output_dir", str(tmp_path),
                    "--config", str(bad_config)), "syn.yaml: unknown keys ['num_repeats']"))
    for (args, message), result in zip(checks, run_clis(*(args for args, _ in checks))):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args[1], result.stderr)
