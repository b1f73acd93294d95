"""The latent reward model (LRM): a time-aware preference score of a *noisy latent*, after LPO.

LPO's LRM-XL (see docs/reference ``flash-dmd-method.md`` §6) runs the SDXL UNet's down and mid blocks on
the noisy latent x_t at timestep t, average-pools a few feature maps, projects their concatenation to an
embedding V and scores it against the pooled CLIP-G text embedding T with CLIP's scaled cosine. Here the
same design speaks to both families through the adapters' feature taps (:meth:`Family.features`):

    f_i = GAP(feature_i(backbone, x_t, t, c))                 (B, C_i)   i in taps
    V   = g_v(LN([f_1, ..., f_n] (+ phi(t))))                 (B, D)     g_v: 2-layer MLP
    T   = g_t(c.pooled_embeds)                                (B, D)     g_t: 2-layer MLP
    s(x_t, t, c) = exp(tau) * cos(V, T),   exp(tau) <= 100,  tau initialised to ln(1/0.07)

* backbone -- a copy of the teacher's denoiser (initialised from the teacher): the UNet's down blocks and
  mid block (SDXL) or a few evenly spaced joint transformer blocks (SD3), as (B, C_i, h_i, w_i) maps.
  ``train_backbone``: ``False`` (frozen; the teacher itself is shared, nothing copied, only the heads
  train), ``True`` (a full copy trains) or ``"lora"`` (a copy with LoRA adapters on the attention
  projections; only the adapters train).
* ``phi(t)`` -- optional sinusoidal embedding of t / t_max (``time_embed_dim`` > 0; LPO has none: its
  time awareness comes only through the backbone). Useful when the backbone is frozen.
* ``feature_cfg_scale`` -- LPO's Visual Feature Enhancement on the deepest tap:
  f_deep = f_uncond + w * (f_cond - f_uncond), one batched [null; cond] forward (doubles the cost; off
  by default).

The maps are exactly those of :meth:`Family.features` (same adapter hooks), but :meth:`tap_features`
ends the forward right after the deepest selected tap, so the UNet's up blocks never run.

Differences from LPO, on purpose: the adapters' UNet taps are each down block's *output* (after its
downsampler) rather than the last resnet before it; the text side is the family's frozen pooled
embedding (SDXL: text_encoder_2's projection; SD3: both CLIPs' pooled) through a trainable MLP, instead
of a trainable text encoder.

Storage (no pickles): ``DIR/lrm.json`` (config) + ``DIR/lrm.safetensors`` (heads, plus the full backbone
for ``train_backbone=True`` or only the LoRA weights for ``"lora"``). A frozen backbone is stored as a
pointer: the config's ``teacher`` names the teacher folder (a world name such as ``world-sdxl``, a path
relative to the LRM folder, or an absolute path).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd import FlashDMDError, io, plugins
from flashdmd.families import Conditioning, load_family, network_call
from flashdmd.families.parts import forward_hooks, unwrap
from flashdmd.networks import lora
from flashdmd.networks.offload import deepcopy_hooked

FORMAT = "flashdmd-lrm"
VERSION = 1
CONFIG_NAME = "lrm.json"
WEIGHTS_NAME = "lrm.safetensors"
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
MAX_TAPS = 4


class _StopForward(Exception):
    """Raised by a forward hook to end the backbone's forward after the deepest tap."""


def default_taps(n: int, max_taps: int = MAX_TAPS) -> list[int]:
    """All ``n`` taps when n <= max_taps, else ``max_taps`` evenly spaced ones ending at the deepest."""
    if n <= max_taps:
        return list(range(n))
    return sorted({round((k + 1) * n / max_taps) - 1 for k in range(max_taps)})


def timestep_embedding(t: Tensor, dim: int, t_max: float) -> Tensor:
    """Sinusoidal embedding (B, dim) of u = t / t_max in [0, 1]: [sin(u * 1000 * f_k), cos(u * 1000 * f_k)]
    with f_k = 10000^(-k / (dim/2)), k = 0..dim/2-1 (the DDPM embedding of the 0..1000 timestep)."""
    half = dim // 2
    u = t.float() / max(t_max, 1e-8) * 1000.0
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = u[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, d_hidden) -> GELU -> Linear(d_hidden, d_out)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _check_mode(train_backbone) -> bool | str:
    if not (train_backbone is False or train_backbone is True or train_backbone == "lora"):
        raise FlashDMDError(f"train_backbone must be False, True or 'lora', got {train_backbone!r}")
    return train_backbone


class LatentRewardModel(nn.Module):
    """Preference score s(x_t, t, c) of a noisy latent (see the module docstring for the equations).

    Args:
        family: a :class:`flashdmd.families.Family` (its teacher initialises the backbone, its schedule
            gives t_max, its :meth:`features` taps the backbone).
        backbone: a network of the family's architecture to use as-is (default: the teacher, copied when it
            trains).
        proj_dim: D, the embedding size of both sides.
        hidden_dim: the MLPs' hidden width.
        train_backbone: False | True | "lora" (see the module docstring).
        taps: indices into ``family.features(...)`` (default :func:`default_taps`).
        time_embed_dim: size of phi(t) appended to the pooled features (0: none, as LPO).
        feature_cfg_scale: LPO's Visual Feature Enhancement weight on the deepest tap (None: off).
        lora_rank: LoRA rank when ``train_backbone == "lora"``.
        teacher: how :meth:`save` names the teacher folder (default: the family's path; world folders are
            written as their names).
    """

    def __init__(self, family, backbone: nn.Module | None = None, proj_dim: int = 256, hidden_dim: int = 512,
                 train_backbone: bool | str = False, taps: list[int] | None = None, time_embed_dim: int = 0,
                 feature_cfg_scale: float | None = None, lora_rank: int = 8, teacher: str | None = None):
        super().__init__()
        self.family = family
        self.train_backbone = _check_mode(train_backbone)
        if proj_dim < 1 or hidden_dim < 1 or time_embed_dim < 0 or time_embed_dim % 2:
            raise FlashDMDError("LRM sizes: proj_dim and hidden_dim must be >= 1 and time_embed_dim even and >= 0")
        net = family.denoiser if backbone is None else backbone
        if self.train_backbone is False:
            net.requires_grad_(False)
        else:
            if backbone is None:  # a trained copy: weights in the model dtype, not the (lower) frozen one
                full = self.train_backbone is True and family.frozen_dtype != family.dtype
                net = family.load_denoiser(family.dtype) if full else deepcopy_hooked(net, {})
            if self.train_backbone == "lora":
                lora.attach(net, lora_rank, lora_rank, family.dtype)
            else:
                net.requires_grad_(True)
        self.backbone = net
        self.lora_rank = int(lora_rank)
        self.proj_dim, self.hidden_dim = int(proj_dim), int(hidden_dim)
        self.time_embed_dim = int(time_embed_dim)
        self.feature_cfg_scale = None if feature_cfg_scale is None else float(feature_cfg_scale)
        self.teacher = teacher if teacher is not None else _teacher_spec(family)

        n_taps, channels, text_dim = self._probe()
        self.taps = default_taps(n_taps) if taps is None else [int(i) for i in taps]
        if not self.taps or any(not -n_taps <= i < n_taps for i in self.taps):
            raise FlashDMDError(f"LRM taps {self.taps} out of range: the {family.name} backbone has {n_taps} feature taps")
        self.taps = [i % n_taps for i in self.taps]
        self.tap_channels = [channels[i] for i in self.taps]
        self.text_dim = text_dim
        d_feat = sum(self.tap_channels) + self.time_embed_dim
        self.feature_norm = nn.LayerNorm(d_feat)
        self.visual_proj = mlp(d_feat, self.hidden_dim, self.proj_dim)
        self.text_proj = mlp(self.text_dim, self.hidden_dim, self.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.to(family.device)

    # -- construction helpers ----------------------------------------------------------------------

    @torch.no_grad()
    def _probe(self) -> tuple[int, list[int], int]:
        """(number of feature taps, channels of each, pooled text dim) from one forward on a zero latent."""
        fam = self.family
        res = fam.default_resolution
        x = torch.zeros((1,) + tuple(fam.latent_shape(res, res)), device=fam.device)
        t = torch.full((1,), float(fam.schedule.t_max) / 2, device=fam.device)
        cond = fam.null_conditioning(1)
        feats = fam.features(self.backbone, x, t, cond)
        return len(feats), [int(f.shape[1]) for f in feats], int(cond.pooled_embeds.shape[-1])

    # -- scoring -----------------------------------------------------------------------------------

    def tap_features(self, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        """The selected feature taps (B, C_i, h_i, w_i), i in :attr:`taps`, of one conditional forward.

        Same maps as ``family.features(backbone, ...)``, but the forward stops right after the deepest
        selected tap (the UNet's up blocks never run: ~2.4x cheaper on the tiny SDXL UNet).
        """
        fam = self.family
        modules = fam._feature_modules(unwrap(self.backbone))[: max(self.taps) + 1]

        def stop(*_):
            raise _StopForward

        with forward_hooks(modules, lambda out: fam._feature_map(out, x_t)) as outputs:
            handle = modules[-1].register_forward_hook(stop)
            try:
                fam._forward(self.backbone, x_t, t, cond)
            except _StopForward:
                pass
            finally:
                handle.remove()
        return [outputs[i] for i in self.taps]

    def pooled_features(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """Global-average-pooled taps, concatenated: (B, sum C_i). Backbone gradients flow only when the
        backbone trains or ``x_t`` requires grad (a frozen backbone otherwise runs without a graph)."""
        fam = self.family
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        need_graph = torch.is_grad_enabled() and (self.train_backbone is not False or x_t.requires_grad)
        with torch.set_grad_enabled(need_graph):
            if self.feature_cfg_scale is None:
                return torch.cat([f.float().mean(dim=(2, 3)) for f in self.tap_features(x_t, t, cond)], dim=1)
            null = fam.null_conditioning(len(cond)).to(cond.prompt_embeds.device)
            null = replace(null, add_time_ids=cond.add_time_ids)
            feats = self.tap_features(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([null, cond]))
            pooled = []
            for k, f in enumerate(feats):
                unc, con = f.float().mean(dim=(2, 3)).chunk(2)
                deepest = k == len(feats) - 1
                pooled.append(unc + self.feature_cfg_scale * (con - unc) if deepest else con)
        return torch.cat(pooled, dim=1)

    def embed_latent(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """V / |V|: (B, D) unit embedding of noisy latents x_t (B, C, h, w) at model timesteps t (B,)."""
        f = self.pooled_features(x_t, t, cond)
        if self.time_embed_dim:
            t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
            f = torch.cat([f, timestep_embedding(t, self.time_embed_dim, float(self.family.schedule.t_max))], dim=1)
        return F.normalize(self.visual_proj(self.feature_norm(f)), dim=-1)

    def embed_text(self, cond) -> Tensor:
        """T / |T|: (B, D) unit embedding of the conditioning's pooled text embedding (B, P)."""
        return F.normalize(self.text_proj(cond.pooled_embeds.float()), dim=-1)

    def score(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """s = exp(tau) * cos(V, T), shape (B,), for x_t (B, C, h, w), t (B,) or scalar, cond of B rows."""
        if x_t.ndim != 4 or len(cond) != x_t.shape[0]:
            raise FlashDMDError(f"LRM.score needs x_t (B,C,h,w) and a conditioning of B rows; got x_t "
                                f"{tuple(x_t.shape)} and {len(cond)} conditioning rows")
        with network_call("reward model (LRM)", self, x_t):
            v = self.embed_latent(x_t, t, cond)
            u = self.embed_text(cond)
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * (v * u).sum(dim=-1)

    forward = score

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "LatentRewardModel":
        super().train(mode)
        if self.train_backbone is False:
            self.backbone.eval()  # the shared teacher keeps its eval mode
        return self

    # -- persistence -------------------------------------------------------------------------------

    def config(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "family": self.family.name, "teacher": self.teacher,
                "proj_dim": self.proj_dim, "hidden_dim": self.hidden_dim, "train_backbone": self.train_backbone,
                "taps": self.taps, "tap_channels": self.tap_channels, "text_dim": self.text_dim,
                "time_embed_dim": self.time_embed_dim, "feature_cfg_scale": self.feature_cfg_scale,
                "lora_rank": self.lora_rank, "backbone_class": type(self.backbone).__name__,
                "teacher_fingerprint": self.teacher_fingerprint()}

    def teacher_fingerprint(self) -> str | None:
        """sha256 (16 hex) of the teacher weights the stored heads depend on (frozen or LoRA backbone; None
        for a fully stored backbone), so :meth:`load` refuses heads trained on a different teacher: the teacher
        folder's denoiser files as stored (:func:`weights_fingerprint`), whatever ``model_frozen_dtype`` loads."""
        if self.train_backbone is True:
            return None
        return weights_fingerprint(Path(self.family.path) / self.family.denoiser_subfolder)

    def state_to_save(self) -> dict[str, Tensor]:
        """Heads always; the backbone in full (``True``), its LoRA weights (``"lora"``) or not at all."""
        state = {}
        for name, t in self.state_dict().items():
            if name.startswith("backbone."):
                if self.train_backbone is False or (self.train_backbone == "lora" and "lora_" not in name):
                    continue
            state[name] = t.detach().cpu().contiguous()
        return state

    def save(self, directory, extra_config: dict | None = None) -> Path:
        """Write ``lrm.json`` + ``lrm.safetensors`` into ``directory`` (created), each atomically; return the
        folder."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state_to_save()
        io.atomic_save(d / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)), "the reward model",
                       sum(v.numel() * v.element_size() for v in state.values()))
        cfg = self.config()
        if extra_config:
            cfg.update(extra_config)
        io.atomic_write_text(d / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory, family=None, device=None) -> "LatentRewardModel":
        """Load a saved LRM. ``family``: a loaded Family (its teacher is the frozen backbone / the base of
        the stored one), a folder or world name, or None to load the teacher the config points to."""
        d = Path(directory)
        cfg = read_config(d)
        if family is None or isinstance(family, (str, os.PathLike)):
            spec = family if family is not None else resolve_teacher(cfg["teacher"], d)
            family = load_family(spec, device=device or "cpu")
        if family.name != cfg["family"]:
            raise FlashDMDError(f"LRM at {d} is for family {cfg['family']!r} but a {family.name!r} model was given")
        try:
            state = load_file(str(d / WEIGHTS_NAME))
        except Exception as e:  # corrupt header / truncated file
            raise FlashDMDError(f"cannot read {d / WEIGHTS_NAME}: {e}") from None
        model = cls(family, proj_dim=cfg["proj_dim"], hidden_dim=cfg["hidden_dim"],
                    train_backbone=cfg["train_backbone"], taps=cfg["taps"], time_embed_dim=cfg["time_embed_dim"],
                    feature_cfg_scale=cfg["feature_cfg_scale"], lora_rank=cfg.get("lora_rank", 8),
                    teacher=cfg["teacher"])
        stored = cfg.get("teacher_fingerprint")
        if stored is not None and stored != model.teacher_fingerprint():
            raise FlashDMDError(f"LRM at {d} was trained on other {cfg['teacher']} weights (fingerprint {stored}, "
                                f"this teacher {model.teacher_fingerprint()}); retrain it with `flashdmd reward train`")
        if model.tap_channels != cfg["tap_channels"] or model.text_dim != cfg["text_dim"]:
            raise FlashDMDError(f"LRM at {d} was trained on a different backbone (taps of {cfg['tap_channels']} "
                                f"channels, text dim {cfg['text_dim']}); this teacher gives {model.tap_channels} and "
                                f"{model.text_dim}")
        expected = model.state_to_save()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise FlashDMDError(f"{d / WEIGHTS_NAME} does not match its config: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
        model.load_state_dict(state, strict=False)
        return model.to(device or family.device)

    @classmethod
    def on_meta(cls, directory, family) -> "LatentRewardModel":
        """The saved LRM's architecture on ``family`` (a Family on the meta device) without its weights: what
        `flashdmd plan` counts. Only ``lrm.json`` is read (the backbone is the teacher itself, a full copy or a LoRA
        copy, as it says)."""
        d = Path(directory)
        config = d / CONFIG_NAME
        if not config.is_file():
            raise FlashDMDError(f"rl_reward_model {d}: no {CONFIG_NAME} (the folder `flashdmd reward train` writes)")
        c = io.read_json(config)
        with torch.device("meta"):
            model = cls(family, proj_dim=c["proj_dim"], hidden_dim=c["hidden_dim"], train_backbone=c["train_backbone"],
                        taps=c["taps"], time_embed_dim=c["time_embed_dim"], feature_cfg_scale=c["feature_cfg_scale"],
                        lora_rank=c.get("lora_rank", 8), teacher=c.get("teacher"))
        return model.requires_grad_(False).eval()


# the files diffusers' / transformers' from_pretrained reads from a model folder (no variant), in their order of choice
WEIGHT_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLED_WEIGHT_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_FINGERPRINTS: dict[tuple, str] = {}


def weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained(folder)`` loads (a shard index's shards, or the one file; never a
    ``.fp16`` variant beside them); FlashDMDError when the folder holds none."""
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            shards = io.read_json(index).get("weight_map")
            if not isinstance(shards, dict):
                raise FlashDMDError(f"{index} is not a shard index (no weight_map)")
            shards = sorted(set(shards.values()))
            return [folder / f for f in shards]
    for name in WEIGHT_FILES + PICKLED_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FlashDMDError(f"{folder} holds no weight file ({', '.join(WEIGHT_FILES)}) to fingerprint")


def _stored_tensors(path: Path):
    """(name, dtype code, shape, raw bytes) of every tensor in a weight file, as stored: a safetensors file's bytes
    straight from the file (its header gives each tensor's byte range), a pickled one's through
    ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            try:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            except (struct.error, ValueError) as e:
                raise FlashDMDError(f"{path} is not a readable safetensors file ({e})") from None
            base = 8 + n
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                start, end = info["data_offsets"]
                f.seek(base + start)
                yield name, info["dtype"], info["shape"], f.read(end - start)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with other objects, a truncated file
        raise FlashDMDError(f"cannot read {path} as weights only: {type(e).__name__}") from None
    for name in sorted(state):
        t = state[name].detach().contiguous().reshape(-1)
        yield name, str(t.dtype).removeprefix("torch."), list(state[name].shape), t.view(torch.uint8).numpy().tobytes()


def weights_fingerprint(folder: str | Path) -> str:
    """First 16 hex digits of sha256 over the tensors of a model folder's weight files AS STORED (every tensor's
    name, stored dtype, shape and bytes, by name): independent of the dtype and device a run loads the network in
    -- fp32, fp16 and bf16 loads of one folder agree exactly. (Rounding the loaded values to a common precision
    cannot promise that: fp32 -> fp16 -> bf16 differs from fp32 -> bf16 for values near a rounding boundary, and no
    rounding rule avoids double rounding for every value.) A folder re-saved in another dtype holds other weights
    and gets another fingerprint. Hashed once per process and file version (path, size, mtime)."""
    files = weight_files(Path(folder))
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            for name, dtype, shape, data in _stored_tensors(f):
                h.update(f"{name}|{dtype}|{shape}|".encode())
                h.update(data)
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def read_config(d: Path) -> dict:
    """The LRM config of folder ``d``; FlashDMDError when the folder is not an LRM folder."""
    c, w = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise FlashDMDError(f"LRM folder {d} does not exist; pass a folder written by `flashdmd reward train`")
    if not (c.is_file() and w.is_file()):
        raise FlashDMDError(f"{d} is not an LRM folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg = io.read_json(c, want=None)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise FlashDMDError(f"{c} is not a flashdmd LRM config (format is not {FORMAT!r})")
    needed = ("family", "teacher", "proj_dim", "hidden_dim", "train_backbone", "taps", "tap_channels", "text_dim",
              "time_embed_dim", "feature_cfg_scale")
    lacking = [k for k in needed if k not in cfg]
    if lacking:
        raise FlashDMDError(f"{c} lacks {', '.join(lacking)}")
    return cfg


def _teacher_spec(family) -> str:
    """A plug-in's model folder is named by its model name (``world-sdxl``); anything else by its absolute path."""
    return plugins.model_name(family.path) or str(Path(family.path).resolve())


def resolve_teacher(spec: str, lrm_dir: Path) -> str:
    """A config's teacher pointer -> something ``load_family`` takes (world name, or a path; relative paths
    are relative to the LRM folder)."""
    if plugins.model_folder(spec) is not None or Path(spec).is_absolute():
        return spec
    return str((lrm_dir / spec).resolve())
