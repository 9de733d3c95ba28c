"""How much a synthetic row helps predict the anchors: the `sklearn` scorer back-end of r1_s4.

A small nearest-neighbour model is fitted on the contrast rows (ds0) and on the contrast rows plus the synthetic row
(ds1); both predict the anchors' targets; gain_score = score(ds1) - score(ds0), with macro-F1 (classification) or R2
(regression; the reference's regression scorer was broken) on the anchors. A fast, offline proxy for the `llm` scorer
(a LLaMA answering the ds0/ds1 prompts), which is not built yet.
"""

import numpy as np
from sklearn.metrics import f1_score, matthews_corrcoef, r2_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from step0_coldstart.evaluate import Encoder
from step0_coldstart.tabular import Schema


def anchor_score(schema: Schema, encoder: Encoder, train: list[dict], anchors: list[dict], metric: str = "f1") -> float:
    x, y = encoder.distance_matrix(train), [r[schema.target] for r in train]
    k = min(3, len(train))
    if schema.task == "classification":
        model = KNeighborsClassifier(n_neighbors=k).fit(x, [str(v) for v in y])
        truth, predicted = [str(a[schema.target]) for a in anchors], model.predict(encoder.distance_matrix(anchors))
        return float(matthews_corrcoef(truth, predicted) if metric == "mcc" else
                     f1_score(truth, predicted, average="macro"))
    model = KNeighborsRegressor(n_neighbors=k).fit(x, np.array(y, dtype=float))
    return float(r2_score([float(a[schema.target]) for a in anchors], model.predict(encoder.distance_matrix(anchors))))


def sklearn_gain(schema: Schema, encoder: Encoder, synthetic: dict, contrast: list[dict], anchors: list[dict],
                 metric: str = "f1") -> dict:
    ds0 = anchor_score(schema, encoder, contrast, anchors, metric)
    ds1 = anchor_score(schema, encoder, [synthetic] + contrast, anchors, metric)
    return {"ds0": {"score": ds0}, "ds1": {"score": ds1}, "gain_score": ds1 - ds0}
