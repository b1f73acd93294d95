"""PickScore (Kirstain et al. 2023) from a local folder: a transformers ``CLIPModel`` plus its processor files.

score(image, prompt) = logit_scale.exp() * cos(E_img, E_txt), exactly PickScore's inference code (the
reported metric is the mean; PickScore v1 gives about 20-23 for SDXL-class images).

On disk: the model ``yuvalkirstain/PickScore_v1`` (a fine-tuned CLIP-ViT-H/14) and the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore loads its processor from there) in ONE folder::

    pickscore/
      config.json, model.safetensors     from yuvalkirstain/PickScore_v1 (CLIPModel)
      tokenizer files                    from laion/CLIP-ViT-H-14-laion2B-s32B-b79K
      preprocessor_config.json           from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (224, bicubic, OpenAI mean/std)

e.g. on a machine with internet: ``CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1").save_pretrained(d)``
and ``AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").save_pretrained(d)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashdmd.evaluation.backends.clip_score import CLIPEmbedder


class PickScore(CLIPEmbedder):
    WHAT = "PickScore"
    HINT = "PickScore_v1 CLIPModel + the CLIP-ViT-H-14 processor files in one folder"

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        scale = self.model.logit_scale.exp().float()
        return (scale * self.cosine(images, prompts)).cpu()
