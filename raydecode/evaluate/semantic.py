"""Semantic decoding (CLIP-MUSED): multi-label classification of the 80 COCO categories from brain activity.

``scores`` are a classifier's (N, C) outputs, ``labels`` the images' multi-hot categories. mAP is the mean over
classes of average precision and ROC AUC the macro mean over classes, both rank-based on the raw scores
(scikit-learn's ``average_precision_score`` / ``roc_auc_score``); a class without a positive test image has
no average precision and is skipped (AUC also skips classes without a negative). Hamming loss is the fraction
of wrong label bits once the sigmoid of the scores (the scores themselves when ``logits=False``) is
thresholded at ``threshold`` (``>=``).
"""

from __future__ import annotations

import numpy as np

from raydecode.errors import ConfigError


def semantic_metrics(scores, labels, threshold: float = 0.5, logits: bool = True) -> dict[str, float]:
    """Returns map, auc, hamming, classes (how many classes the mAP averages over) and chance_map (the expected mAP
    of random scores, :func:`chance_map`)."""
    from scipy.special import expit
    from sklearn.metrics import average_precision_score, hamming_loss, roc_auc_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ConfigError(f"semantic metrics need scores and labels of the same (N, C) shape, got scores "
                          f"{scores.shape} and labels {labels.shape}")
    if not np.isfinite(scores).all():
        raise ConfigError("semantic metrics: scores contain NaN or inf")
    if not np.isin(labels, (0, 1)).all():
        raise ConfigError("semantic metrics: labels must be multi-hot (only 0 and 1)")
    labels = labels.astype(np.int64)
    positives = labels.sum(0)
    has_pos, has_both = positives > 0, (positives > 0) & (positives < len(labels))
    if not has_both.any():
        raise ConfigError(f"semantic metrics: none of the {labels.shape[1]} classes has both positive and "
                          f"negative labels among the {len(labels)} samples")
    predicted = (expit(scores) if logits else scores) >= threshold
    return {
        "map": float(average_precision_score(labels[:, has_pos], scores[:, has_pos], average="macro")),
        "auc": float(roc_auc_score(labels[:, has_both], scores[:, has_both], average="macro")),
        "hamming": float(hamming_loss(labels, predicted.astype(np.int64))),
        "classes": float(has_pos.sum()),
        "chance_map": chance_map(positives[has_pos], len(labels)),
    }


def chance_map(positives, n: int) -> float:
    """The expected mAP of random scores: per class with k of n samples positive, E[AP] = H_n / n +
    (k - 1)(n - H_n) / (n (n - 1)) (H_n the n-th harmonic number), averaged over the classes. On a small test set
    it is well above the mean prevalence (one positive among 30 images: 0.133, not 0.033)."""
    k = np.asarray(positives, dtype=np.float64)
    h = float(np.sum(1.0 / np.arange(1, n + 1)))
    expected = h / n + (k - 1) * (n - h) / (n * (n - 1)) if n > 1 else np.ones_like(k)
    return float(np.mean(expected))
