"""Preference rewards: pairs files, the latent reward model's training (the model itself lives in
:mod:`flashdmd.networks.reward`).

* :mod:`flashdmd.rewards.pairs` -- the pairs file format (JSONL + companion latents), :func:`load_pairs`,
  `flashdmd reward make-pairs` (the embedded world's oracle judges teacher vs student samples);
* :mod:`flashdmd.rewards.train` -- :func:`bradley_terry_loss`, :func:`train_lrm`, `flashdmd reward train`.
"""
from flashdmd.rewards.pairs import PairSet, load_pairs, write_pairs
from flashdmd.rewards.train import NOISE_BANDS, bradley_terry_loss, train_lrm

__all__ = ["PairSet", "load_pairs", "write_pairs", "NOISE_BANDS", "bradley_terry_loss", "train_lrm"]
