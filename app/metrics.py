"""Zero-shot metrics, defined as CLIP_benchmark defines them."""

from __future__ import annotations

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Balanced accuracy: the mean over classes present in `labels` of the recall of that class."""
    recalls = [float((pred[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), labels, logits.shape[1]),
    }


def ranked_metrics(top: np.ndarray, truth: np.ndarray) -> dict:
    """classification_metrics from each image's ranked class ids (top [n, k], best first) instead of logits: a
    class set's search returns those. Equal to classification_metrics on the same ranking."""
    hit1 = top[:, 0] == truth
    recalls = [float(hit1[truth == c].mean()) for c in dict.fromkeys(truth)]
    return {"acc1": float(hit1.mean()), "acc5": float((top[:, :5] == truth[:, None]).any(axis=1).mean()),
            "mean_per_class_recall": float(np.mean(recalls))}


def retrieval_metrics(sim: np.ndarray, text_to_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """sim [n_images, n_texts]. The CLIP-paper definition: image->text succeeds at k when any caption of the
    image is among its k best texts; text->image when the caption's image is among its k best images."""
    out = {}
    order_t = np.argsort(-sim, axis=1)  # per image, texts best first
    order_i = np.argsort(-sim.T, axis=1)  # per text, images best first
    for k in ks:
        hit_i2t = [(text_to_image[order_t[i, :k]] == i).any() for i in range(sim.shape[0])]
        hit_t2i = (order_i[:, :k] == text_to_image[:, None]).any(axis=1)
        out[f"image_to_text_R@{k}"] = float(np.mean(hit_i2t))
        out[f"text_to_image_R@{k}"] = float(hit_t2i.mean())
    return out


def zero_shot_weights(text_embeddings: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """[C*T, D] template embeddings (class-major) -> [C, D] class weights: mean over templates, re-normalised,
    as open_clip's build_zero_shot_classifier computes them."""
    w = text_embeddings.reshape(n_classes, n_templates, -1).mean(axis=1)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def harmonic_mean(*values: float) -> float:
    """OVEN's harmonic mean (oven_eval.py): a zero counts as 1e-12, so one group at zero pulls the mean to ~0."""
    safe = [v if v != 0 else 1e-12 for v in values]
    return len(safe) / sum(1.0 / v for v in safe)


def group_accuracy(pred_ids, true_ids, groups) -> dict:
    """Top-1 accuracy per group ({group: fraction}) and, when both "seen" and "unseen" are present, their
    harmonic mean as "harmonic_mean": OVEN's evaluate_oven + harmonic_mean, as fractions rather than rounded
    percent. Ids are compared for equality (class id strings or label ints)."""
    if not len(pred_ids) == len(true_ids) == len(groups):
        raise ValueError(f"pred_ids, true_ids and groups differ in length ({len(pred_ids)}, {len(true_ids)}, "
                         f"{len(groups)})")
    hits: dict = {}
    for p, t, g in zip(pred_ids, true_ids, groups):
        hits.setdefault(g, []).append(bool(p == t))
    out = {g: sum(h) / len(h) for g, h in hits.items()}
    if "seen" in out and "unseen" in out:
        out["harmonic_mean"] = harmonic_mean(out["seen"], out["unseen"])
    return out
