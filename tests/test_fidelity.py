"""Fidelity figures of step0_coldstart.evaluate against hand computations and an independent implementation."""

import os

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from conftest import ROOT
from step0_coldstart.evaluate import column_distances, detection_auc, total_variation, wasserstein_1d
from step0_coldstart.tabular import Encoder, load_rows, load_schema


def test_total_variation_by_hand():
    # p = {x: 1/2, y: 1/4, z: 1/4}, q = {x: 1/4, y: 3/4}: (1/4 + 1/2 + 1/4) / 2
    assert total_variation(["x", "x", "y", "z"], ["x", "y", "y", "y"]) == pytest.approx(0.5)
    assert total_variation(["a", "b"], ["b", "a"]) == 0.0
    assert total_variation(["a"], ["b"]) == 1.0
    assert total_variation(["a", None], ["a", "a"]) == pytest.approx(0.5)  # missing is a value of its own


def test_wasserstein_by_hand_and_against_scipy():
    assert wasserstein_1d([0, 1], [2, 3]) == pytest.approx(2.0)  # every unit of mass moves by 2
    assert wasserstein_1d([0, 0, 1], [0, 1, 1]) == pytest.approx(1 / 3)  # 1/3 of the mass moves from 0 to 1
    assert wasserstein_1d([5, 1, 3], [3, 1, 5]) == 0.0
    rng = np.random.default_rng(0)
    for n, m in ((7, 7), (50, 13), (200, 333)):
        a, b = rng.normal(size=n), rng.exponential(size=m) * 3
        assert wasserstein_1d(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-9)


def test_column_distances_standardise_numbers_by_the_real_std(tmp_path):
    (tmp_path / "t.csv").write_text("x,c\n0,a\n1,a\n")
    (tmp_path / "t.yaml").write_text(f"name: t\ncsv: {tmp_path / 't.csv'}\ntarget: c\ntask: classification\n"
                                     "columns: {x: float, c: category}\n")
    schema = load_schema(str(tmp_path / "t.yaml"))
    real = [{"x": 0.0, "c": "a"}, {"x": 1.0, "c": "a"}]
    syn = [{"x": 2.0, "c": "a"}, {"x": 3.0, "c": "b"}, {"x": None, "c": "b"}, {"x": 2.0, "c": "a"}]
    # x: every real value lies below every synthetic one, so W1([0, 1], [2, 3, 2]) = mean 7/3 - mean 1/2 = 11/6;
    # over the real std 0.5 -> 11/3 (the missing x is left out); c: TV({a: 1}, {a: 1/2, b: 1/2}) = 1/2
    assert column_distances(schema, real, syn) == {"x": pytest.approx(11 / 3, abs=1e-4), "c": 0.5}


@pytest.fixture(scope="module")
def abalone():
    schema = load_schema(os.path.join(ROOT, "configs/tabular/abalone.yaml"))
    rows = load_rows(schema)
    return schema, rows, Encoder(schema, rows)


def test_detection_auc_is_chance_for_other_real_rows_and_one_for_shifted_rows(abalone):
    schema, rows, encoder = abalone
    order = np.random.default_rng(1).permutation(len(rows))
    real, other = [rows[i] for i in order[:1200]], [rows[i] for i in order[1200:2400]]
    assert abs(detection_auc(schema, encoder, real, other, seed=0) - 0.5) < 0.06
    far = [dict(r, Length=r["Length"] + 10.0) for r in other]  # ~80 standard deviations away
    assert detection_auc(schema, encoder, real, far, seed=0) > 0.99
    assert detection_auc(schema, encoder, real, far, seed=0) == detection_auc(schema, encoder, real, far, seed=0)
