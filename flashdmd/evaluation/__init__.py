"""Evaluation of generated images in the embedded world: a frozen classifier and pure metric functions.

The evaluation classifier is never used as a training signal (the oracle and the GAN have their own nets).
"""
from flashdmd.evaluation.classifier import EvalClassifier, load_eval_classifier
from flashdmd.evaluation.metrics import (alignment, diversity, evaluate_images, fd_features, feature_stats, floor,
                                         frechet_distance, reference_stats, within_class_spread)

__all__ = ["EvalClassifier", "load_eval_classifier", "alignment", "diversity", "evaluate_images", "fd_features",
           "feature_stats", "floor", "frechet_distance", "reference_stats", "within_class_spread"]
