"""ImageReward (Xu et al. 2023) from a local folder: a BLIP image-text encoder in transformers format plus
ImageReward's MLP head as safetensors.

The real ImageReward-v1.0 is BLIP (ViT-L/16 at 224 as image encoder; a BERT-base text encoder whose layers
cross-attend to the image tokens) and an MLP on the text encoder's [CLS] output::

    reward = (MLP(text_encoder(prompt tokens, cross-attending to vision(image))[:, 0]) - 0.16717362830052426)
             / 1.0333394966054072

with the prompt tokenised by BLIP's BERT tokenizer (padding to max_length 35, truncation). In transformers
the image-text encoder is exactly ``BlipForImageTextRetrieval``'s ``vision_model`` + ``text_encoder`` (a
BlipTextModel with cross-attention; its projections and ITM head are unused here).

On disk::

    imagereward/
      config.json, model.safetensors   BlipForImageTextRetrieval (model_type "blip"): vision_config ViT-L/16
                                       (hidden 1024, 24 layers, image_size 224, patch 16), text_config
                                       BERT-base (hidden 768, 12 layers, encoder_hidden_size 1024)
      tokenizer files                  BLIP's bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json;
                                       BLIP adds [DEC] as bos and [ENC]: vocab 30524)
      mlp_head.safetensors             ImageReward's MLP: layers.{0,2,4,6,7}.{weight,bias} =
                                       Linear(768,1024), Linear(1024,128), Linear(128,64), Linear(64,16), Linear(16,1)
      imagereward.json                 optional: {"mean": 0.16717362830052426, "std": 1.0333394966054072,
                                       "max_length": 35}
      preprocessor_config.json         optional; default: 224 bicubic resize + centre crop, OpenAI CLIP mean/std
                                       (ImageReward's own transform)

Conversion note (once, on a machine with ImageReward.pt): load its state_dict with
``torch.load(..., weights_only=True)``; ``mlp.layers.*`` -> ``mlp_head.safetensors`` (drop the ``mlp.``
prefix); ``blip.visual_encoder.*`` -> ``vision_model.*`` with the renames of transformers' BLIP conversion
script (models/blip/convert_blip_original_pytorch_to_hf.py, ``rename_key``: blocks -> encoder.layers,
attn -> self_attn, attn.proj -> self_attn.projection, norm1/norm2 -> layer_norm1/2, norm -> post_layernorm,
patch_embed.proj -> embeddings.patch_embedding, pos_embed -> embeddings.position_embedding, cls_token ->
embeddings.class_embedding); ``blip.text_encoder.*`` -> ``text_encoder.*`` (same BERT names); then load
into ``BlipForImageTextRetrieval(config)`` (strict, except the unused vision_proj/text_proj/itm_head) and
``save_pretrained``; save the BLIP tokenizer alongside.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BlipForImageTextRetrieval

from flashdmd import FlashDMDError, io
from flashdmd.evaluation.backends import (ImagePreprocess, check_images, load_tokenizer, load_transformers_model,
                                          require_folder)

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35
HEAD_FILE = "mlp_head.safetensors"


class RewardMLP(nn.Module):
    """ImageReward's MLP head (dropouts are no-ops at evaluation; indices kept so the keys match)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageReward:
    WHAT = "ImageReward"
    NEEDS = ("config.json", HEAD_FILE)
    HINT = "a BlipForImageTextRetrieval folder + mlp_head.safetensors; see flashdmd/evaluation/backends/imagereward.py"

    def __init__(self, blip, head: RewardMLP, tokenizer, preprocess: ImagePreprocess, mean=MEAN, std=STD,
                 max_length=MAX_LENGTH, device="cpu"):
        self.blip, self.head, self.tokenizer, self.preprocess = blip, head, tokenizer, preprocess
        self.mean, self.std, self.max_length = float(mean), float(std), int(max_length)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu"):
        folder = require_folder(path, cls.WHAT, cls.NEEDS, cls.HINT)
        blip = load_transformers_model(BlipForImageTextRetrieval, folder, cls.WHAT, device, "blip")
        head = RewardMLP(int(blip.config.text_config.hidden_size))
        try:
            sd = load_file(str(folder / HEAD_FILE))
            head.load_state_dict(sd, strict=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise FlashDMDError(f"{folder / HEAD_FILE} is not ImageReward's MLP head "
                                f"(layers.{{0,2,4,6,7}}.weight/bias): {first}") from None
        extra = {}
        if (folder / "imagereward.json").is_file():
            extra = io.read_json(folder / "imagereward.json")
        tok = load_tokenizer(folder, cls.WHAT)
        pre = ImagePreprocess.from_folder(folder, int(blip.config.vision_config.image_size))
        return cls(blip, head.eval().requires_grad_(False).to(device), tok, pre, extra.get("mean", MEAN),
                   extra.get("std", STD), extra.get("max_length", MAX_LENGTH), device)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        x = self.preprocess(images.to(self.device))
        image_embeds = self.blip.vision_model(pixel_values=x).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        text = self.blip.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        reward = self.head(text.last_hidden_state[:, 0, :].float())[:, 0]
        return ((reward - self.mean) / self.std).cpu()
