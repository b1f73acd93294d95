"""LPO's released latent reward model (LRM-XL), loaded from its own folder layout and scored exactly as LPO does.

LPO (Kwai-Kolors/LPO, ``SDXLBasePreferenceModel``) saves a folder with

    unet/              a fine-tuned SDXL UNet (diffusers; only its down and mid blocks are used)
    text_encoder/      fine-tuned CLIP-L (CLIPTextModel)            -- absent when trained with frozen encoders:
    text_encoder_2/    fine-tuned CLIP-G (CLIPTextModelWithProjection)   then the base model's (here: the teacher's)
    state_dict.pt      {"visual_projection": {"weight": (P, 3520)}, "logit_scale": float or 0-d tensor}

and scores a noisy latent x at timestep t against a prompt as

    ctx, ctx_u   = [CLIP-L penultimate ; CLIP-G penultimate] of the prompt and of "" (both padded to 77 tokens)
    T, T_u       = CLIP-G's projected pooled output of the prompt and of ""
    down, mid    = UNet down blocks + mid block on [x; x] at [t; t] with contexts [ctx; ctx_u], added text
                   embeddings [T; T_u] and fixed time ids (H, W, 0, 0, H, W), H = W = sample_size * VAE factor
                   (1024 for SDXL) whatever the latent's size
    f_i          = GAP(down_block_res_samples[i]) of the conditional half, i = 2, 5, 8 (SDXL: 320, 640, 1280
                   channels, each block's last resnet before its downsampler)
    f_mid        = GAP(mid_u) + w (GAP(mid) - GAP(mid_u))                   feature CFG, w = 7.5 in LPO's config
    V            = W_proj [f_2, f_5, f_8, f_mid]      (no bias; a single-scale model projects f_mid alone)
    score        = exp(logit_scale) * cos(V, T)       (no clamp)

LPO ranks the candidates x_{t-1} of a step from t with ``t`` (the step's current timestep), not t-1: so does
:attr:`scores_at` = "current" here. LPO runs the model in fp16; here the UNet, the text encoders and the projection
are held and run in the teacher's frozen dtype (``model_frozen_dtype``: fp16 is LPO's own arithmetic), the pooling,
the feature CFG and the cosine in float32 (one rounding less than LPO's fp16; within the half-precision bound of
tests/test_half_precision.py).

Only ``state_dict.pt`` is read with ``torch.load(..., weights_only=True)``; the networks load from safetensors
(``use_safetensors=True``), nothing else is unpickled.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor, nn
from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

from flashdmd import FlashDMDError, io
from flashdmd.families import network_call

TAPS = (2, 5, 8)  # LPO's down_block_res_samples indices (multi-scale)
STATE_NAME = "state_dict.pt"
DEFAULT_FEATURE_CFG = 7.5


class _StopAfterMid(Exception):
    pass


def is_lpo_folder(path: str | Path) -> bool:
    """A folder in LPO's LRM layout: ``state_dict.pt`` and ``unet/config.json``."""
    p = Path(path)
    return (p / STATE_NAME).is_file() and (p / "unet" / "config.json").is_file()


def res_sample_channels(unet_config: dict) -> list[int]:
    """Channels of each of a diffusers UNet2DConditionModel's ``down_block_res_samples`` (conv_in, then every down
    block's resnets and its downsampler), from its config."""
    out = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    layers = [layers] * len(out) if isinstance(layers, int) else list(layers)
    chans = [out[0]]
    for b, c in enumerate(out):
        chans += [c] * layers[b] + ([c] if b < len(out) - 1 else [])
    return chans


def _read_state(d: Path) -> tuple[Tensor, float]:
    try:
        state = torch.load(d / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with other objects, a truncated file
        raise FlashDMDError(f"cannot read {d / STATE_NAME} as LPO's LRM state (weights only): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        weight = state["visual_projection"]["weight"]
        scale = state["logit_scale"]
    except (KeyError, TypeError):
        raise FlashDMDError(f"{d / STATE_NAME} is not LPO's LRM state: it needs visual_projection.weight and "
                            "logit_scale") from None
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise FlashDMDError(f"{d / STATE_NAME}: visual_projection.weight must be a 2-D tensor")
    return weight.float(), float(torch.as_tensor(scale).float())


def check_lpo_folder(path: str | Path, family) -> dict:
    """The checks of :func:`_checked`, as a summary (what ``check_only`` callers need)."""
    return _checked(path, family)[0]


def _checked(path: str | Path, family) -> tuple[dict, Tensor, float]:
    """Everything about an LPO LRM folder that can be checked without loading its networks (a real one is several
    GB): the layout, safetensors weights, state_dict.pt, and that it fits the teacher (an SDXL-architecture family
    with the same latent channels; the projection's width matches the UNet's taps). Returns (a summary, the
    projection weight, logit_scale): state_dict.pt is read once."""
    d = Path(path)
    if family.name != "sdxl":
        raise FlashDMDError(f"rl_reward_model {d} is LPO's LRM (an SDXL UNet scoring SDXL latents); the teacher is "
                            f"{family.name}: train an LRM for it with `flashdmd reward train` (docs/PAIRS.md)")
    for sub in ("unet", "text_encoder", "text_encoder_2"):
        if (d / sub).is_dir() and not any((d / sub).glob("*.safetensors")):
            raise FlashDMDError(f"{d / sub} holds no .safetensors weights; flashdmd loads no pickled weights: save "
                                f"it with save_pretrained(..., safe_serialization=True) first")
    if not (d / "unet").is_dir():
        raise FlashDMDError(f"{d} has no unet/ folder")
    unet_cfg = io.read_json(d / "unet" / "config.json")
    if unet_cfg.get("in_channels") != family.latent_channels:
        raise FlashDMDError(f"LPO LRM {d}: its UNet takes {unet_cfg.get('in_channels')} latent channels, the teacher's "
                            f"latents have {family.latent_channels}")
    weight, scale = _read_state(d)
    chans = res_sample_channels(unet_cfg)
    mid = unet_cfg["block_out_channels"][-1]
    if weight.shape[1] == mid:
        multi = False
    elif max(TAPS) < len(chans) and weight.shape[1] == sum(chans[i] for i in TAPS) + mid:
        multi = True
    else:
        raise FlashDMDError(f"LPO LRM {d}: visual_projection takes {weight.shape[1]} features, but this UNet's taps "
                            f"{list(TAPS)} + mid give {sum(chans[i] for i in TAPS if i < len(chans)) + mid} "
                            f"(or {mid} single-scale)")
    te2 = d / "text_encoder_2" if (d / "text_encoder_2").is_dir() else Path(family.path) / "text_encoder_2"
    if not (te2 / "config.json").is_file() or not ((d / "text_encoder").is_dir() or
                                                   (Path(family.path) / "text_encoder" / "config.json").is_file()):
        raise FlashDMDError(f"LPO LRM {d}: no text_encoder/ and text_encoder_2/ in it nor in the teacher folder "
                            f"{family.path}")
    text_dim = io.read_json(te2 / "config.json").get("projection_dim")
    if weight.shape[0] != text_dim:
        raise FlashDMDError(f"LPO LRM {d}: visual_projection gives {weight.shape[0]}-d embeddings, its text encoder "
                            f"{te2} {text_dim}-d ones")
    return {"multi_scale": multi, "projection": tuple(weight.shape), "logit_scale": scale,
            "fine_tuned_text_encoders": (d / "text_encoder").is_dir() and (d / "text_encoder_2").is_dir()}, \
        weight, scale


class LPORewardModel(nn.Module):
    """LPO's LRM (see the module docstring): ``score(x_t, t, prompts=...)`` -> (B,). Frozen; no training here."""

    scores_at = "current"  # the step's own timestep for its x_{t-1} candidates, as LPO
    needs_prompts = True

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module, tokenizer, tokenizer_2,
                 projection: Tensor, logit_scale: float, image_size: int, feature_cfg: float = DEFAULT_FEATURE_CFG):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        # in the projection's own dtype (the UNet's: load() casts it), so that the whole model is held in one dtype
        self.visual_projection = nn.Linear(projection.shape[1], projection.shape[0], bias=False,
                                           dtype=projection.dtype, device=projection.device)
        with torch.no_grad():
            self.visual_projection.weight.copy_(projection)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        chans = res_sample_channels(dict(unet.config))
        self.multi_scale = projection.shape[1] != unet.config.block_out_channels[-1]
        if self.multi_scale and projection.shape[1] != sum(chans[i] for i in TAPS) + unet.config.block_out_channels[-1]:
            raise FlashDMDError("LPO LRM: visual_projection does not fit the UNet's taps")
        self.image_size = int(image_size)
        self.feature_cfg = float(feature_cfg)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, directory, family, feature_cfg: float = DEFAULT_FEATURE_CFG) -> "LPORewardModel":
        """From LPO's folder; text encoders absent from it (trained frozen) come from the teacher's folder, the
        tokenizers are the teacher's (LPO's come from its base SDXL, whose tokenizers an SDXL teacher shares)."""
        d = Path(directory)
        _, weight, scale = _checked(d, family)
        dtype = family.frozen_dtype

        def text(sub, kind):
            src = d / sub if (d / sub).is_dir() else Path(family.path) / sub
            if not (src / "config.json").is_file():
                raise FlashDMDError(f"LPO LRM {d}: no {sub}/ in it nor in the teacher folder {family.path}")
            return kind.from_pretrained(src, use_safetensors=True, torch_dtype=dtype)
        try:
            unet = UNet2DConditionModel.from_pretrained(d / "unet", use_safetensors=True, torch_dtype=dtype)
            te1, te2 = text("text_encoder", CLIPTextModel), text("text_encoder_2", CLIPTextModelWithProjection)
        except FlashDMDError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise FlashDMDError(f"cannot load LPO LRM {d}: {str(e).splitlines()[0]}") from None
        tok1, tok2 = family.tokenizers
        size = int(unet.config.sample_size) * family.vae_scale_factor
        model = cls(unet, te1, te2, tok1, tok2, weight.to(dtype), scale, size, feature_cfg)
        return model.to(family.device)

    @classmethod
    def on_meta(cls, directory, family, feature_cfg: float = DEFAULT_FEATURE_CFG) -> "LPORewardModel":
        """The same model on the meta device, built from the folder's configs and state_dict.pt's shapes (no
        weights loaded): what `flashdmd plan` counts."""
        d = Path(directory)
        _, weight, scale = _checked(d, family)

        def src(sub):
            return d / sub if (d / sub).is_dir() else Path(family.path) / sub
        dtype = family.frozen_dtype
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")).to(dtype)
            te1 = CLIPTextModel(AutoConfig.from_pretrained(src("text_encoder"))).to(dtype)
            te2 = CLIPTextModelWithProjection(AutoConfig.from_pretrained(src("text_encoder_2"))).to(dtype)
            tok1, tok2 = family.tokenizers
            size = int(unet.config.sample_size) * family.vae_scale_factor
            return cls(unet, te1, te2, tok1, tok2, torch.empty(weight.shape, dtype=dtype), scale, size, feature_cfg)

    # -- text ------------------------------------------------------------------------------------------

    def _ids(self, tokenizer, prompts: list[str]) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.logit_scale.device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(context (N, 77, D1 + D2), pooled (N, P)) of ``prompts`` through the LRM's own encoders, as LPO's
        get_text_features: both penultimate hidden states, CLIG-G's projected pooled output."""
        out1 = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
        out2 = self.text_encoder_2(self._ids(self.tokenizer_2, prompts), output_hidden_states=True)
        return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2.text_embeds

    # -- image ------------------------------------------------------------------------------------------

    def _down_and_mid(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> tuple[list[Tensor], Tensor]:
        """down_block_res_samples and the mid block's output of one UNet forward that stops after the mid block."""
        unet = self.unet
        res: list[Tensor] = []
        mid: list[Tensor] = []

        def on_conv_in(_m, _a, out):
            res.append(out)

        def on_down(_m, _a, out):
            res.extend(out[1])

        def on_mid(_m, _a, out):
            mid.append(out)
            raise _StopAfterMid

        s = self.image_size
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=context.dtype, device=x.device).repeat(x.shape[0], 1)
        hooks = [unet.conv_in.register_forward_hook(on_conv_in), unet.mid_block.register_forward_hook(on_mid)]
        hooks += [b.register_forward_hook(on_down) for b in unet.down_blocks]
        try:
            unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                 return_dict=False)
        except _StopAfterMid:
            pass
        finally:
            for h in hooks:
                h.remove()
        return res, mid[0]

    @torch.no_grad()
    def score(self, x_t: Tensor, t: Tensor, cond=None, prompts: list[str] | None = None) -> Tensor:
        """exp(logit_scale) * cos(V, T) of noisy latents x_t (B, C, h, w) at model timesteps t (B,) or scalar,
        for B prompts (``cond``, the teacher's conditioning, is not used: the LRM has its own encoders)."""
        if prompts is None or len(prompts) != x_t.shape[0] or x_t.ndim != 4:
            raise FlashDMDError(f"LPO LRM score needs x_t (B,C,h,w) and B prompts; got {tuple(x_t.shape)} and "
                                f"{None if prompts is None else len(prompts)} prompts")
        with network_call("LPO reward model", self, x_t):
            return self._score(x_t, t, prompts)

    def _score(self, x_t: Tensor, t: Tensor, prompts: list[str]) -> Tensor:
        b = x_t.shape[0]
        dtype = next(self.unet.parameters()).dtype  # the frozen dtype: inputs go to the networks in it, as LPO's fp16
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        context, pooled = (e.to(dtype) for e in self.encode_text(list(prompts) + [""]))
        ctx_c, ctx_u = context[:b], context[b:].expand(b, -1, -1)
        pool_c, pool_u = pooled[:b], pooled[b:].expand(b, -1)
        use_cfg = self.feature_cfg > 1.0
        x = x_t.to(dtype)
        if use_cfg:
            res, mid = self._down_and_mid(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx_c, ctx_u]),
                                          torch.cat([pool_c, pool_u]))
        else:
            res, mid = self._down_and_mid(x, t, ctx_c, pool_c)
        gap = lambda f: f.float().mean(dim=(2, 3))  # noqa: E731
        m = gap(mid)
        if use_cfg:
            m_c, m_u = m.chunk(2)
            m = m_u + self.feature_cfg * (m_c - m_u)
        feats = [gap(res[i])[:b] for i in TAPS] + [m] if self.multi_scale else [m]
        v = self.visual_projection(torch.cat(feats, dim=1).to(self.visual_projection.weight.dtype)).float()
        return self.logit_scale.float().exp() * (F.normalize(v, dim=-1) * F.normalize(pool_c.float(), dim=-1)).sum(-1)

    forward = score
