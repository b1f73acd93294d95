"""Preference rewards: judges, pairs files, the latent reward model's training (the model itself lives in
:mod:`flashdmd.networks.reward`). Nothing here knows a plug-in: the embedded world's oracle reaches
make-pairs as the world plug-in's ``judge`` (flashdmd/world/judge.py).

* :mod:`flashdmd.evaluation.judges` -- the :class:`Judge` protocol, :func:`load_judge` (PickScore, HPSv2,
  ImageReward, CLIP score from local weights through the metric backends), :func:`choose`;
* :mod:`flashdmd.rewards.pairs` -- the pairs file format (JSONL + companion latents; docs/PAIRS.md),
  :func:`load_pairs`, `flashdmd reward make-pairs` (:func:`make_pairs`: two models, one judge);
* :mod:`flashdmd.rewards.train` -- :func:`bradley_terry_loss`, :func:`train_lrm`, `flashdmd reward train`.
"""
from flashdmd.evaluation.judges import JUDGES, Judge, ScorerJudge, choose, load_judge
from flashdmd.rewards.pairs import PairSet, load_pairs, make_pairs, write_pairs
from flashdmd.rewards.train import NOISE_BANDS, bradley_terry_loss, train_lrm

__all__ = ["JUDGES", "Judge", "ScorerJudge", "choose", "load_judge", "PairSet", "load_pairs", "make_pairs",
           "write_pairs", "NOISE_BANDS", "bradley_terry_loss", "train_lrm"]
