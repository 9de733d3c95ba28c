"""How much a synthetic row helps predict the anchors (r1_s4): contrast rows, the ds0/ds1 prompts, two back-ends.

The reference's structure: for every anchor k, up to three *contrast* rows are picked once (KMeans with 4 clusters over
the real training rows; from each cluster other than the anchor's, one random row whose label differs from the
anchor's; regression labels are quantile bins). ds0[k] asks for anchor k's target after the contrast rows as solved
examples; ds1[k] is the same with the synthetic row as the first example. A row's gain_score = score(ds1) - score(ds0)
over all anchors: how much it helps as a one-shot example.

Back-ends, one interface (`score(schema, anchors, contrasts, synthetic, metric) -> {"pairs", "missing", "score"}`):
  - `llm`: a LLaMA answers the ds0/ds1 prompts (text); the answer is extracted as the reference does (classification:
    exactly one whole-word, case-insensitive label match; regression: the first line is a number).
  - `sklearn`: a nearest-neighbour model over standardised features (all example rows of the prompt, weighted by
    inverse distance) predicts the anchor: an offline, fast proxy with the same ds0/ds1 structure. Weighting every
    example keeps the gain continuous, so two rows far from every anchor are still ranked (ties teach nothing).
Scores of answers (the llm back-end, and sklearn's regression): macro-F1 (or MCC) for classification; for regression
1 - sum|prediction - truth| / sum|truth - median|, i.e. the error relative to always answering the anchors' median
(1 is perfect, 0 no better than the median; the reference's regression scorer was broken). A prediction that cannot
be extracted counts as wrong (classification) or as the median (regression), and `missing` is the fraction of such
answers (the reference divided by 2 and dropped them, which let a row gain by making the scorer silent).
sklearn's classification score is the mean over anchors of the neighbours' probability of the gold label (the
inverse-distance weight of the examples that carry it, over all weights). A hard F1 would not be continuous: on a
binary target every contrast row carries the label opposite to its anchor's, so ds0 predicts every anchor wrong, and
a sample changes a prediction only if its weight alone outweighs all the contrast rows'; measured on med and adult,
real training rows as samples did so in 5 and 0 of 64 cases, and every gain of SmolLM2's med samples was 0.
"""

import re
from typing import Callable, Optional

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import f1_score, matthews_corrcoef
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from step0_coldstart.tabular import Encoder, Schema, answer_text, target_bins, task_question

NO_ANSWER = "<no answer>"


def contrast_rows(schema: Schema, train: list[dict], anchors: list[dict], num_clusters: int = 4,
                  seed: int = 42) -> list[list[dict]]:
    """Per anchor: one random training row from each other cluster whose label differs from the anchor's."""
    encoder = Encoder(schema, train)
    kmeans = KMeans(n_clusters=min(num_clusters, len(train)), random_state=seed, n_init=4)
    train_cluster = kmeans.fit_predict(encoder.distance_matrix(train))
    anchor_cluster = kmeans.predict(encoder.distance_matrix(anchors))
    labels = target_bins(schema, train + anchors)
    train_labels, anchor_labels = labels[:len(train)], labels[len(train):]
    rng = np.random.default_rng(seed)
    contrasts = []
    for k in range(len(anchors)):
        picked = []
        for cluster in range(kmeans.n_clusters):
            if cluster == anchor_cluster[k]:
                continue
            pool = [i for i in range(len(train)) if train_cluster[i] == cluster and train_labels[i] != anchor_labels[k]]
            if pool:
                picked.append(train[int(rng.choice(pool))])
        contrasts.append(picked)
    return contrasts


def example_text(schema: Schema, row: dict) -> str:
    return task_question(schema, row) + answer_text(schema, row) + " \n\n"


def scoring_prompts(schema: Schema, anchors: list[dict], contrasts: list[list[dict]],
                    synthetic: Optional[dict] = None) -> list[dict]:
    """ds0 (synthetic=None) or ds1 prompts: {"question", "gold"} per anchor. A synthetic row without a target cannot be
    a solved example: its ds1 is ds0 (gain 0)."""
    usable = synthetic is not None and synthetic.get(schema.target) is not None
    lead = example_text(schema, synthetic) if usable else ""
    return [{"question": lead + "".join(example_text(schema, c) for c in contrast) + task_question(schema, anchor),
             "gold": answer_text(schema, anchor)} for anchor, contrast in zip(anchors, contrasts)]


def extract_answer(schema: Schema, text: str) -> Optional[str]:
    """The prediction in a model's answer, or None (the reference's rules)."""
    if schema.task == "classification":
        choices = sorted(set(schema.labels.values()) or set(schema.categories.get(schema.target, [])))
        found = [c for c in choices if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, flags=re.I)]
        return found[0] if len(found) == 1 else None
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first.replace(",", "") if re.fullmatch(r"-?\d[0-9,]*(\.\d+)?", first) else None


def anchor_score(schema: Schema, golds: list[str], predictions: list[Optional[str]], metric: str = "f1") -> dict:
    """{"pairs", "missing", "score"} of predictions (None = no answer) against the anchors' gold answers."""
    missing = sum(p is None for p in predictions)
    if schema.task == "classification":
        predicted = [NO_ANSWER if p is None else p for p in predictions]
        if metric == "mcc":
            score = matthews_corrcoef(golds, predicted)
        else:
            score = f1_score(golds, predicted, labels=sorted(set(golds)), average="macro", zero_division=0)
    else:
        truth = np.array([float(g) for g in golds])
        median = float(np.median(truth))
        predicted = np.array([median if p is None else float(p) for p in predictions])
        spread = np.abs(truth - median).sum()
        score = 1.0 - np.abs(predicted - truth).sum() / spread if spread > 0 else float(np.allclose(predicted, truth))
    return {"pairs": len(golds), "missing": missing / max(len(golds), 1), "score": float(score)}


class SklearnBackend:
    """Inverse-distance-weighted neighbours over the prompt's example rows (standardised numbers, one-hot categories):
    scikit-learn's KNeighbors with weights="distance" and every example as a neighbour."""

    def __init__(self, schema: Schema, train: list[dict]):
        self.encoder = Encoder(schema, train)

    def _neighbours(self, schema: Schema, anchor: dict, contrast: list[dict], synthetic: Optional[dict]):
        """The fitted neighbour model of one anchor's examples and the anchor's features, or None without examples."""
        usable = synthetic is not None and synthetic.get(schema.target) is not None
        examples = ([synthetic] if usable else []) + contrast
        if not examples:
            return None
        x, y = self.encoder.distance_matrix(examples), [answer_text(schema, e) for e in examples]
        if schema.task == "classification":
            model = KNeighborsClassifier(n_neighbors=len(examples), weights="distance").fit(x, y)
        else:
            model = KNeighborsRegressor(n_neighbors=len(examples), weights="distance").fit(x, [float(v) for v in y])
        return model, self.encoder.distance_matrix([anchor])

    def predict(self, schema: Schema, anchors: list[dict], contrasts: list[list[dict]],
                synthetic: Optional[dict]) -> list[Optional[str]]:
        predictions = []
        for anchor, contrast in zip(anchors, contrasts):
            fitted = self._neighbours(schema, anchor, contrast, synthetic)
            if fitted is None:
                predictions.append(None)
            elif schema.task == "classification":
                predictions.append(str(fitted[0].predict(fitted[1])[0]))
            else:
                predictions.append(repr(float(fitted[0].predict(fitted[1])[0])))
        return predictions

    def score(self, schema: Schema, anchors: list[dict], contrasts: list[list[dict]], synthetic: Optional[dict],
              metric: str = "f1") -> dict:
        """Regression: the answers' score. Classification (`metric` unused): the mean over anchors of the neighbours'
        probability of the gold label (0 where no example carries it, or there is no example)."""
        golds = [answer_text(schema, a) for a in anchors]
        if schema.task != "classification":
            return anchor_score(schema, golds, self.predict(schema, anchors, contrasts, synthetic), metric)
        probabilities = []
        for anchor, contrast, gold in zip(anchors, contrasts, golds):
            fitted = self._neighbours(schema, anchor, contrast, synthetic)
            classes = [] if fitted is None else list(fitted[0].classes_)
            probabilities.append(float(fitted[0].predict_proba(fitted[1])[0][classes.index(gold)])
                                 if gold in classes else 0.0)
        return {"pairs": len(golds), "missing": 0.0, "score": float(np.mean(probabilities)) if golds else 0.0}


class LLMBackend:
    """A LLaMA answers the ds0/ds1 questions; `answer(questions) -> texts` is the sampler call (batched, resumable)."""

    def __init__(self, answer: Callable[[list[str]], list[str]]):
        self.answer = answer

    def predict(self, schema: Schema, anchors: list[dict], contrasts: list[list[dict]],
                synthetic: Optional[dict]) -> list[Optional[str]]:
        questions = [p["question"] for p in scoring_prompts(schema, anchors, contrasts, synthetic)]
        return [extract_answer(schema, text) for text in self.answer(questions)]

    def score(self, schema: Schema, anchors: list[dict], contrasts: list[list[dict]], synthetic: Optional[dict],
              metric: str = "f1") -> dict:
        golds = [answer_text(schema, a) for a in anchors]
        return anchor_score(schema, golds, self.predict(schema, anchors, contrasts, synthetic), metric)


def gain(backend, schema: Schema, anchors: list[dict], contrasts: list[list[dict]], synthetic: dict,
         ds0: dict, metric: str = "f1") -> dict:
    """{"ds0", "ds1", "gain_score"} of one synthetic row; ds0 is computed once per data set and passed in."""
    ds1 = backend.score(schema, anchors, contrasts, synthetic, metric)
    return {"ds0": ds0, "ds1": ds1, "gain_score": ds1["score"] - ds0["score"]}


def baseline(backend, schema: Schema, anchors: list[dict], contrasts: list[list[dict]], metric: str = "f1") -> dict:
    return backend.score(schema, anchors, contrasts, None, metric)
