"""HPSv2 (Wu et al. 2023) from a local transformers ``CLIPModel`` folder converted from its open_clip checkpoint.

The real HPSv2 is an open_clip ViT-H-14 (``laion2B-s32B-b79K`` architecture, GELU) fine-tuned on HPD v2 and
shipped as ``HPS_v2_compressed.pt`` (or ``HPS_v2.1_compressed.pt``). We do not depend on open_clip: convert
the checkpoint once into a transformers CLIPModel folder (same architecture, renamed keys, q/k/v split):

    python -m flashdmd.evaluation.backends.hpsv2 HPS_v2.1_compressed.pt BASE_FOLDER OUT_FOLDER

where BASE_FOLDER is a local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its config.json, tokenizer
files and preprocessor_config.json are reused; its weights are replaced). :func:`convert_open_clip_state_dict`
is the key mapping. The checkpoint is read with ``torch.load(weights_only=True)``.

score(image, prompt) = 100 * cos(E_img, E_txt). hpsv2's own ``hpsv2.score`` returns the bare cosine
(about 0.25-0.32); papers tabulate it x100, as here (so 28.5 here = 0.285 there).

On disk (OUT_FOLDER)::

    hpsv2/
      config.json, model.safetensors     CLIPModel (ViT-H/14 vision 1280x32, text 1024x24, projection 1024)
      tokenizer files                    CLIP BPE (open_clip's tokenizer is the same BPE, 77 tokens)
      preprocessor_config.json           224, bicubic, centre crop, OpenAI mean/std (open_clip's val transform)
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPConfig, CLIPModel

from flashdmd import FlashDMDError
from flashdmd.evaluation.backends.clip_score import CLIPEmbedder


class HPSv2(CLIPEmbedder):
    WHAT = "HPSv2"
    HINT = ("a CLIPModel folder converted from HPS_v2*_compressed.pt: "
            "python -m flashdmd.evaluation.backends.hpsv2 CKPT BASE OUT")

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (100.0 * self.cosine(images, prompts)).cpu()


# ---------------------------------------------------------------------------------------------------
# open_clip -> transformers conversion

_BLOCK = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
          ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def convert_open_clip_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP (ViT vision tower, default text tower) state_dict -> transformers CLIPModel keys."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in ("attn_mask", "visual.attn_mask") or k.endswith(".attn_mask"):
            continue
        if k in _TOP:
            out[_TOP[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif (m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", k)):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            for a, b in _BLOCK:
                if rest.startswith(a):
                    out[prefix + b + rest[len(a):]] = v
                    break
            else:
                raise FlashDMDError(f"open_clip key {k!r} has no CLIPModel counterpart (not a plain ViT CLIP?)")
        else:
            raise FlashDMDError(f"open_clip key {k!r} has no CLIPModel counterpart (not a plain ViT CLIP?)")
    return out


def convert_checkpoint(checkpoint: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write OUT = BASE's config/tokenizer/processor + the converted open_clip weights (a CLIPModel folder)."""
    ckpt, base, out = Path(checkpoint), Path(base), Path(out)
    if not ckpt.is_file():
        raise FlashDMDError(f"HPSv2 checkpoint {ckpt} not found")
    if not (base / "config.json").is_file():
        raise FlashDMDError(f"base folder {base} has no config.json: give a local laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure is one user-facing line
        raise FlashDMDError(f"{ckpt} does not load as a weights-only torch checkpoint ({type(e).__name__})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise FlashDMDError(f"{ckpt} holds no state_dict of tensors")
    model = CLIPModel(CLIPConfig.from_pretrained(str(base)))
    missing, unexpected = model.load_state_dict(convert_open_clip_state_dict(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FlashDMDError(f"{ckpt} does not fit {base}'s CLIPConfig: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    model.config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 4:
        print("usage: python -m flashdmd.evaluation.backends.hpsv2 CHECKPOINT.pt BASE_CLIP_FOLDER OUT_FOLDER")
        sys.exit(2)
    try:
        print(convert_checkpoint(*sys.argv[1:]))
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
