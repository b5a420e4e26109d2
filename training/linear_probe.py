"""Logistic regression on fixed features, and its held-out report: shared by the image classifier
(training/classifier.py, training/classifier_default.py) and the text intent classifier
(training/intent.py)."""

from __future__ import annotations

import numpy as np


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train and test indices."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)


def choose_c(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0),
             folds: int = 4, standardize: bool = False, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The inverse L2 strength of the best mean cross-validated accuracy on (x, y), the training split
    alone, and every candidate's accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = max(2, min(folds, int(np.bincount(y).min())))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = {}
    for c in grid:
        model = LogisticRegression(C=c, max_iter=5000)
        model = make_pipeline(StandardScaler(), model) if standardize else model
        scores[c] = round(float(cross_val_score(model, x, y, cv=cv).mean()), 4)
    return max(grid, key=lambda c: (scores[c], -c)), scores


def fit(x: np.ndarray, y: np.ndarray, C: float, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of a multinomial logistic regression on raw features `x`.

    With `standardize`, it is fitted on standardised features and the scaler is folded into the head:
    W((x - mu) / sigma) + b == (W / sigma) x + (b - W mu / sigma), so the head takes raw features.
    `y` holds class indices 0..C-1 and every class must occur in it.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mu, sigma = (x.mean(0), x.std(0) + 1e-8) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    lr = LogisticRegression(C=C, max_iter=5000).fit((x - mu) / sigma, y)
    if lr.coef_.shape[0] == 1:  # two classes: sklearn keeps one row; softmax over (-z/2, z/2) is the same
        lr.coef_, lr.intercept_ = np.vstack([-lr.coef_, lr.coef_]) / 2, np.hstack([-lr.intercept_, lr.intercept_]) / 2
    weight = lr.coef_ / sigma
    return weight, lr.intercept_ - weight @ mu


def report(labels: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> tuple[dict, str]:
    """Accuracy, per-class recall and the confusion matrix as a dict, and the matrix as a table
    (rows: true label, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=range(len(labels)))
    width = max(5, *(len(s) for s in labels))
    lines = [" " * width + " " + " ".join(f"{s[:width]:>{width}}" for s in labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"{label:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
    totals = matrix.sum(1)
    metrics = {
        "accuracy": round(float((y_true == y_pred).mean()), 4) if len(y_true) else None,
        "n": int(len(y_true)),
        "recall": {s: round(float(matrix[i, i] / totals[i]), 4) for i, s in enumerate(labels) if totals[i]},
        "confusion": matrix.tolist(),
    }
    return metrics, "\n".join(lines)
