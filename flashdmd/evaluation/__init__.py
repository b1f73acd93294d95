"""Evaluation of generated images: pure metric functions, the Evaluator protocol, metric backends for real
models (FID, CLIP score, PickScore, HPSv2, ImageReward from local weights), `flashdmd eval` and the report.

The embedded world's own metrics (its classifier's FD, alignment, diversity, oracle) live in the world
plug-in (flashdmd/world/metrics.py) and reach evaluation only through the Evaluator protocol.
"""
from flashdmd.evaluation.evaluator import Evaluator, worsened
from flashdmd.evaluation.metrics import (alignment, diversity, fd_features, feature_stats, frechet_distance,
                                         within_class_spread)

__all__ = ["Evaluator", "worsened", "alignment", "diversity", "fd_features", "feature_stats", "frechet_distance",
           "within_class_spread"]
