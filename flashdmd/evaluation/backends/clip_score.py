"""CLIP score from a local transformers ``CLIPModel`` folder.

score(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0), the standard definition (Hessel et al.
2021 with w = 100, as torchmetrics' ``CLIPScore``); the reported metric is the mean over images.

On disk (e.g. ``save_pretrained`` of ``openai/clip-vit-large-patch14``, the usual choice for text-to-image
papers, or ``openai/clip-vit-base-patch32``)::

    clip/
      config.json                 CLIPConfig (model_type "clip")
      model.safetensors           (or pytorch_model.bin)
      tokenizer files             vocab.json + merges.txt + tokenizer_config.json (or tokenizer.json)
      preprocessor_config.json    optional: CLIPImageProcessor settings (size, crop_size, image_mean/std);
                                  without it: resize + centre crop to vision_config.image_size, OpenAI mean/std

Texts are truncated to the text model's 77 tokens. :class:`CLIPEmbedder` is the shared base of
:class:`~flashdmd.evaluation.backends.pickscore.PickScore` and :class:`~flashdmd.evaluation.backends.hpsv2.HPSv2`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel

from flashdmd.evaluation.backends import (ImagePreprocess, check_images, load_tokenizer, load_transformers_model,
                                          require_folder)


class CLIPEmbedder:
    """A CLIPModel + tokenizer + torch preprocessing; gives unit-norm image and text embeddings."""

    WHAT = "CLIP"
    NEEDS = ("config.json",)
    HINT = "a transformers CLIPModel folder (config.json, model.safetensors, tokenizer files)"

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, device="cpu"):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device = torch.device(device)
        tc = model.config.text_config
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), int(tc.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu"):
        folder = require_folder(path, cls.WHAT, cls.NEEDS, cls.HINT)
        model = load_transformers_model(CLIPModel, folder, cls.WHAT, device, "clip")
        tok = load_tokenizer(folder, cls.WHAT)
        pre = ImagePreprocess.from_folder(folder, int(model.config.vision_config.image_size))
        return cls(model, tok, pre, device)

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        x = self.preprocess(check_images(images).to(self.device))
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N,) cos(image_i, prompt_i)."""
        check_images(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class CLIPScore(CLIPEmbedder):
    """CLIP score: 100 * max(cos, 0) per image."""

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (100.0 * self.cosine(images, prompts).clamp_min(0)).cpu()
