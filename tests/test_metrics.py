"""Metric functions on hand-computed cases."""

import numpy as np
import pytest

from app.metrics import classification_metrics, mean_per_class_recall, retrieval_metrics, topk_accuracy, zero_shot_weights


def test_topk_and_balanced_accuracy_by_hand():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    labels = np.array([0, 1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == 0.5  # rows 0 and 1
    assert topk_accuracy(logits, labels, 2) == 0.75  # row 2 has label 1 second; row 3 has label 0 last
    assert topk_accuracy(logits, labels, 5) == 1.0  # k beyond the class count means every class
    # class 0: rows 0, 3 -> 1 of 2 right; class 1: rows 1, 2 -> 1 of 2; class 2 absent
    assert mean_per_class_recall(logits.argmax(1), labels, 3) == 0.5
    imbalanced = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0])
    assert mean_per_class_recall(pred, imbalanced, 2) == 0.5  # not the 0.75 plain accuracy
    m = classification_metrics(logits, labels)
    assert m == {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}


def test_retrieval_recall_counts_every_caption_of_an_image():
    # 2 images, 4 captions: captions 0,1 belong to image 0; 2,3 to image 1
    text_to_image = np.array([0, 0, 1, 1])
    sim = np.array([[0.1, 0.9, 0.8, 0.0],   # image 0: best text is caption 1 (its own) -> hit at 1
                    [0.9, 0.1, 0.2, 0.3]])  # image 1: texts ranked 0, 3, 2, 1 -> own caption first at rank 2
    m = retrieval_metrics(sim, text_to_image, ks=(1, 2))
    assert m["image_to_text_R@1"] == 0.5 and m["image_to_text_R@2"] == 1.0
    # text -> image: caption 0 ranks image 1 first (miss at 1), caption 1 image 0 (hit), caption 2 image 0 (miss),
    # caption 3 image 1 (hit)
    assert m["text_to_image_R@1"] == 0.5 and m["text_to_image_R@2"] == 1.0


def test_zero_shot_weights_average_templates_then_normalise():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # class 0: 2 templates, class 1: 2 templates
    w = zero_shot_weights(t, 2, 2)
    np.testing.assert_allclose(w, [[np.sqrt(0.5), np.sqrt(0.5)], [1.0, 0.0]])
    with pytest.raises(ValueError):
        zero_shot_weights(t, 3, 2)
