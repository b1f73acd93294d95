"""Z-Image: ZImageTransformer2DModel (single-stream DiT), rectified flow, a Qwen3 language model as text encoder.

Conventions, matching ``ZImagePipeline`` (diffusers 0.42):

* each prompt is wrapped in the tokenizer's chat template (one user message, ``add_generation_prompt=True``,
  ``enable_thinking=True``), tokenized to ``max_sequence_length`` 512 (padded, truncated) and encoded by the
  Qwen3 model with its attention mask; the prompt embedding is the second-to-last hidden state
  (``hidden_states[-2]``) of the real tokens only. The pipeline hands the network a list of these variable-length
  embeddings; flashdmd keeps them padded to the batch's longest, with :attr:`Conditioning.prompt_mask`, and
  :meth:`ZImageFamily._forward` rebuilds the list. There is no pooled text embedding: ``pooled_embeds`` is
  :func:`~flashdmd.families.parts.masked_mean` of the token embeddings (read by the LRM and the Pixel-GAN head
  only). The unconditional branch is the "" prompt, chat template included;
* latents stay (B, C, H/8, W/8) everywhere in flashdmd, C = the VAE's 16 latent channels; only the network sees
  them as a list of (C, 1, h, w) frames (it patchifies them 2x2 itself), and the image side must be a multiple of
  16 (2x2 patches of the 8x VAE); latents = (z - shift_factor) * scaling_factor;
* the network is called at the reversed, normalised time t' = (1000 - t) / 1000 = 1 - sigma and returns the
  negated flow velocity x0 - eps; ``_forward`` gives every caller the ordinary flow velocity u = eps - x0 at the
  model timestep t = 1000 * sigma;
* CFG: ZImagePipeline's ``guidance_scale`` g means ``cond + g * (cond - uncond)`` and g = 0 is no guidance (one
  forward); flashdmd's guidance w everywhere (``dm_guidance_scale``, samplers) is ``uncond + w * (cond -
  uncond)``, so w = g + 1 -- the pipeline's default g = 5.0 is w = 6.0. The pipeline's ``cfg_truncation`` (1.0)
  and ``cfg_normalization`` (False) defaults leave every step's guidance untouched, and so do the adapter's
  :attr:`ZImageFamily.cfg_truncation` / :attr:`ZImageFamily.cfg_normalization`; set, they do what the pipeline's
  options do (:meth:`ZImageFamily.raw_prediction`). An exported student is called with ``guidance_scale=0.0``
  (its guidance is distilled in);
* the shift: ZImagePipeline always passes its scheduler mu = calculate_shift(image tokens) and sigmas
  linspace(1, 1/K, K); the scheduler uses mu only with ``use_dynamic_shifting`` (then the flow shift is exp(mu)
  at the run's resolution, rebuilt by :meth:`use_resolution`), else its fixed ``shift`` (Z-Image's 6.0,
  Z-Image-Turbo's 3.0);
* the default image side is ZImagePipeline's 1024 px: 128 latent rows of its 8x VAE (counted in latent rows, as
  FLUX's default_sample_size, so a test VAE with another factor keeps the latent size).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from flashdmd.diffusion import FlowSchedule, bcast, cfg_combine
from flashdmd.families.base import Family
from flashdmd.families.parts import Conditioning, input_dtype, masked_mean

STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_SAMPLE_SIZE = 128  # ZImagePipeline's default 1024 px, in latent rows of its 8x VAE
PIPELINE_GUIDANCE = 5.0  # ZImagePipeline.__call__'s guidance_scale default (cond + g * (cond - uncond))
TIME_SCALE = 1000.0  # ZImagePipeline's t' = (1000 - t) / 1000


def token_list(cond: Conditioning, dtype: torch.dtype) -> list[Tensor]:
    """The pipeline's list of per-prompt embeddings (L_i, D): each row's real tokens (all of them without a mask, and
    on the meta device, whose mask holds no values: `flashdmd plan` traces every row at the batch's padded length, an
    upper bound)."""
    if cond.prompt_mask is None or cond.prompt_mask.device.type == "meta":
        return list(cond.prompt_embeds.to(dtype).unbind(0))
    mask = cond.prompt_mask.bool()
    return [e[m].to(dtype) for e, m in zip(cond.prompt_embeds, mask)]


class ZImageFamily(Family):
    """ZImagePipeline folders (see the module docstring for the conventions)."""
    offload_blocks = ("ZImageTransformerBlock",)

    name = "zimage"
    pipeline_class = "ZImagePipeline"
    denoiser_subfolder = "transformer"
    max_sequence_length = 512  # ZImagePipeline's default text-encoder length
    text_parts = ("text_encoder",)
    tokenizer_parts = ("tokenizer",)
    pipeline_guidance_default = PIPELINE_GUIDANCE
    pipeline_no_guidance = 0.0  # its CFG is cond + g * (cond - uncond): g = 0 is one conditional forward
    latent_patch = 2  # the transformer takes 2x2 latent patches as tokens
    pipeline_sigma_grid = "linspace"  # sigmas linspace(1, 1/K, K) (get_default_z_image_sigmas) and mu
    cfg_truncation: float = 1.0  # ZImagePipeline's defaults: no truncation, no renormalisation (see raw_prediction)
    cfg_normalization: float = 0.0

    def _make_schedule(self, config: dict) -> FlowSchedule:
        self.prediction_type = "flow"
        self._scheduler_config = config
        side = DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        self._size = (side, side)  # the resolution the schedule and scheduler_timesteps are for
        return FlowSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                            shift=self.shift_at(side, side, config))

    def calculate_mu(self, height: int, width: int, config: dict | None = None) -> float:
        """ZImagePipeline's mu at (height, width) pixels: calculate_shift of its (h/2) * (w/2) image tokens."""
        config = config if config is not None else self._scheduler_config
        f = self.vae_scale_factor
        seq = (height // f // 2) * (width // f // 2)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        m = (top - base) / (max_len - base_len)
        return seq * m + (base - m * base_len)

    def shift_at(self, height: int, width: int, config: dict | None = None) -> float:
        """The flow shift at (height, width) pixels: exp(mu) with dynamic shifting, else the fixed ``shift``."""
        config = config if config is not None else self._scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        return math.exp(self.calculate_mu(height, width, config))

    def use_resolution(self, height: int, width: int) -> None:
        """Rebuild the schedule for (height, width) (only a dynamically shifting scheduler changes)."""
        self.check_resolution(height, width)
        self._size = (height, width)
        self.schedule = FlowSchedule(num_train_timesteps=self.schedule.num_train_timesteps,
                                     shift=self.shift_at(height, width))

    def scheduler_timesteps(self, steps: int) -> list[float]:
        """ZImagePipeline's: sigmas linspace(1, 1/steps, steps) and mu of the current resolution (``use_resolution``;
        the default resolution until then) through the folder's scheduler."""
        sched = copy.deepcopy(self.scheduler)
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()  # get_default_z_image_sigmas: float32 grid
        sched.set_timesteps(sigmas=sigmas, mu=self.calculate_mu(*self._size))
        return [float(t) for t in sched.timesteps]

    @property
    def default_resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    @property
    def default_student_timesteps(self) -> list[float]:
        """Uniform unshifted sigmas (1, 0.75, 0.5, 0.25) through the schedule's shift (the pipeline shifts its own
        sigmas the same way)."""
        return [float(t) for t in self.schedule.shifted_timesteps(torch.tensor(STUDENT_SIGMAS)).tolist()]

    # -- text --------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        tok, enc = self.tokenizers[0], self.text_encoders[0]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for p in prompts]
        inputs = tok(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True)
        ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"]).bool()
        meta = enc.device.type == "meta"
        # on the meta device (`flashdmd plan`) the encoder runs without its padding mask: transformers reads the
        # mask's values to build its causal mask, which meta tensors do not hold (the trace misses that mask only)
        kw = {} if meta else {"attention_mask": mask.to(self.device)}
        hidden = enc(input_ids=ids.to(self.device), output_hidden_states=True, **kw).hidden_states[-2]
        # the pipeline's list, hidden[i][mask[i]]: each prompt's real tokens, one run (the tokenizer pads on one
        # side). On the meta device every prompt counts at the full text-encoder length: `flashdmd plan` sizes the
        # longest prompt a run can meet, not the one it traces with
        spans = [(0, len(m)) if meta else (m.index(1), sum(m)) for m in inputs["attention_mask"]]
        rows = [h[start:start + n] for h, (start, n) in zip(hidden, spans)]
        embeds = pad_sequence(rows, batch_first=True).to(self.device)
        lengths = torch.tensor([n for _, n in spans], device=self.device)
        prompt_mask = torch.arange(embeds.shape[1], device=self.device)[None] < lengths[:, None]
        return embeds, masked_mean(embeds, prompt_mask), prompt_mask

    # -- network -----------------------------------------------------------------------------------

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """The base CFG pair, then ZImagePipeline's two options where set (:attr:`cfg_truncation` below 1: rows whose
        normalised time (1000 - t) / 1000 is above it get the conditional prediction alone; :attr:`cfg_normalization`
        c > 0: a row's guided prediction is scaled down to at most c times the norm of its conditional one). Both are
        off by default, as in the pipeline."""
        t = self._timesteps(t, x_t)
        if guidance_scale == 1.0 or (self.cfg_truncation >= 1 and not self.cfg_normalization):
            return super().raw_prediction(net, x_t, t, cond, guidance_scale, uncond)
        uncond = self._default_uncond(cond) if uncond is None else uncond
        both = self._forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        pred_uncond, pred_cond = both.float().chunk(2)
        pred = cfg_combine(pred_uncond, pred_cond, guidance_scale)
        if self.cfg_normalization:
            norm_cond, norm = pred_cond.flatten(1).norm(dim=1), pred.flatten(1).norm(dim=1)
            top = norm_cond * float(self.cfg_normalization)
            pred = torch.where((norm > top)[:, None, None, None], pred * bcast(top / norm, pred), pred)
        late = (TIME_SCALE - t.float()) / TIME_SCALE > self.cfg_truncation
        pred = torch.where(late[:, None, None, None], pred_cond, pred)
        return pred.to(x_t.dtype)

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = input_dtype(net)
        frames = list(x_t.to(dtype).unsqueeze(2).unbind(0))  # (C, 1, h, w) each, as ZImagePipeline feeds them
        t_rev = (TIME_SCALE - t.float()) / TIME_SCALE
        out = net(frames, t_rev, token_list(cond, dtype), return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(x_t.dtype)  # the network answers x0 - eps; flashdmd's flow is eps - x0

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every main (joint image + caption) block."""
        return list(net.layers)

    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        # a main block returns the unified sequence (B, L, C): each row's (h/2 * w/2) image tokens first, row-major
        b, _, c = output.shape
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        return output[:, :h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)

