"""``flashdmd plan``: the peak memory per device of one Stage-1 iteration and one Stage-2 RL update of a configured
run, without loading a weight.

How it counts (docs/ARCHITECTURE.md, "Memory"):

* **Weights, gradients, optimiser state** are counted exactly: every network is built on torch's ``meta`` device
  from the model folder's config files alone (diffusers ``from_config``, transformers ``from config``), in the dtype
  the run gives it, with the run's LoRA adapters and the run's sharing (under LoRA the student and the fake score
  share the teacher's base, :func:`flashdmd.training.roles.copy_sharing_frozen`). Distinct tensor storages are
  attributed to the first role that holds them (teacher, student, fake score, text encoders, VAE, discriminator,
  Stage-2 reference, reward model). Gradients: one per trainable tensor of the roles a phase updates (plus the
  ones its backward reaches: DMD2's generator loss reaches the fake score's weights). AdamW: two states per
  trainable tensor, in its dtype.
* **Activations** are traced: the run's own step functions (:mod:`flashdmd.training.steps`, the same calls
  :func:`flashdmd.training.distill.rollout` makes) run on meta tensors at the configured batch and resolution under
  a dispatch mode that counts the live bytes of every tensor the step creates, through the backward (gradient
  checkpointing recomputation included) -- a full-size SDXL generator step traces in seconds. Attention is counted
  as the fused kernels that CUDA and CPU use hold it (query, key, value, output and the log-sum-exp saved for the
  backward), not as the N x N matrix that the meta device's math fallback would materialise.
* **Phases** follow the loop: generator (with the teacher's CFG forward, the fake score, the low-noise branch
  through the VAE decoder and the Pixel-GAN), fake score, discriminator; Stage 2: candidates, reward model,
  reference, the DPO backward. Each phase's peak is the persistent memory (weights and optimiser states) plus the
  phase's traced peak plus the optimiser step's temporaries; the run's peak is the largest.
* **Parallelism**: one process; DDP over N (adds accelerate's default gradient buckets, one copy of every
  trainable tensor); FSDP2 over N (the student and the fake score, with every tensor they hold, sharded N ways
  along with their gradients and optimiser states; the gathered root unit and two wrapped blocks in flight;
  the teacher, VAE and text encoders replicated as configs/accelerate/fsdp2_8gpu.yaml does).
* **Runtime**: on CUDA a fixed 1 GiB for the CUDA context and library workspaces; on the CPU the resident size of
  this process before it builds anything (the interpreter with torch, diffusers and transformers imported).

benchmarks/plan_check.py checks the estimate against a real run's peak resident memory; tests/test_plan.py checks
the split against the tensors a real tiny run allocates.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flashdmd import FlashDMDError, io

GiB = 2 ** 30
CUDA_RUNTIME_BYTES = 1 * GiB
CARDS_GB = (24, 48, 80, 141)
# a plan "fits" a card when its peak stays under this share of it: the caching allocator's fragmentation and
# kernels' workspaces are not in the plan (a margin, not a measurement; no GPU has checked it yet)
FIT_HEADROOM = 0.95
# configs/accelerate/fsdp2_8gpu.yaml's wrap classes: SDXL's, SD3's, FLUX's double- and single-stream blocks
FSDP_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
ROLE_ORDER = ("teacher", "student", "fake_score", "text_encoders", "vae", "disc", "reference", "reward")


# ---------------------------------------------------------------------------------------------------
# counting live tensors


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the distinct storages that ops create on ``device`` while active, each until it is
    freed; ``peak`` is the largest total seen. Storages that existed before (weights, inputs) are not counted: an
    op's output is new only when it shares no storage with the op's inputs."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._held: dict[int, object] = {}

    def _track(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._held:
            return
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(_ref, key=key, n=n):
            if self._held.pop(key, None) is not None:
                self.live -= n
        self._held[key] = weakref.ref(st, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an in-place op) allocates nothing: only new storages count
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused (flash / memory-efficient) attention kernel, for meta tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def fused_attention():
    """Inside: F.scaled_dot_product_attention on meta tensors without a mask counts as a fused kernel."""
    import torch.nn.functional as F
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        # torch's own parameter names: diffusers' attention dispatcher (FLUX) passes them as keywords
        if query.device.type == "meta" and attn_mask is None:
            return _FusedAttention.apply(query, key, value)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kw)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------------------------------
# networks on the meta device, from config files


def meta_component(path: Path, index: dict, name: str, dtype: torch.dtype, required: bool = True):
    """A pipeline component without its weights: networks built on the meta device from their config files
    (in ``dtype``), tokenizers and schedulers loaded as they are (they hold no weights)."""
    from flashdmd.families.base import component_class, load_component
    cls = component_class(path, index, name)
    if cls is None:
        if required:
            raise FlashDMDError(f"{path}/model_index.json names no {name}; this family needs one")
        return None
    if not issubclass(cls, nn.Module):
        return load_component(path, index, name, dtype, required=required)
    folder = path / name
    if not (folder / "config.json").is_file():
        raise FlashDMDError(f"{folder}/config.json is missing: {name} has no model config")
    with torch.device("meta"):
        if cls.__module__.startswith("diffusers"):
            net = cls.from_config(cls.load_config(folder))
        else:
            net = cls(cls.config_class.from_pretrained(folder))
    if next(net.parameters()).dtype != dtype:
        net = net.to(dtype)
    return net.requires_grad_(False).eval()


def meta_family(spec: str, family: str | None, dtype: torch.dtype, frozen: torch.dtype):
    """The teacher's :class:`~flashdmd.families.Family` with every network on the meta device: latents in ``dtype``,
    loaded parts in ``frozen`` (as ``Family(..., frozen_dtype=...)`` loads them)."""
    from flashdmd.families import FAMILIES, detect_family, resolve_path
    from flashdmd.families.base import read_model_index
    path = resolve_path(spec)
    index = read_model_index(path)
    cls = FAMILIES[family or detect_family(path)]
    fam = cls.__new__(cls)
    fam._load = lambda part, required=True, dtype=None: meta_component(path, index, part, dtype or frozen, required)
    fam.load_denoiser = lambda dt: meta_component(path, index, cls.denoiser_subfolder, dt)
    cls.__init__(fam, path, device="meta", dtype=dtype, frozen_dtype=frozen)
    return fam


# ---------------------------------------------------------------------------------------------------
# the run's roles, as the run builds them


def dtypes(cfg, device: str) -> tuple[torch.dtype, torch.dtype]:
    """(trainable dtype, frozen dtype) of the run on ``device``, as the run resolves them."""
    from flashdmd.training.roles import frozen_dtype
    return getattr(torch, cfg.model_dtype), frozen_dtype(cfg, device)


def _meta_disc(cfg, family, fake_score):
    """The discriminator as roles._build_disc makes it (trainable part in the model dtype, a pixel backbone in the
    frozen dtype, checkpointed with the run's setting), built on the meta device without the backbone's weights."""
    if cfg.disc_kind == "none":
        return None
    if cfg.disc_kind == "latent":
        from flashdmd.networks.discriminator import LatentClassifierHead
        from flashdmd.training.roles import bottleneck
        shape = bottleneck(family, fake_score, cfg.data_resolution or family.default_resolution)
        with torch.device("meta"):
            head = LatentClassifierHead(*shape)
        return head.to(family.dtype)
    from flashdmd.networks.discriminator import PixelDiscriminator, SamBackbone
    if cfg.disc_backbone == "sam":
        from transformers import SamConfig, SamVisionConfig, SamVisionModel
        folder = Path(cfg.disc_backbone_path or "")
        if not (folder / "config.json").is_file():
            raise FlashDMDError(f"disc_backbone_path {folder}: no config.json (a SamModel / SamVisionModel folder)")
        raw = io.read_json(folder / "config.json")
        vision = SamConfig.from_pretrained(folder).vision_config if "vision_config" in raw else \
            SamVisionConfig.from_pretrained(folder)
        with torch.device("meta"):
            backbone = SamBackbone(SamVisionModel(vision))
    else:  # a plug-in's backbone: built by its provider (small), then moved to meta
        from flashdmd import plugins
        backbone = plugins.provider(cfg.disc_backbone, "disc_backbone", "disc_backbone")().to("meta")
    with torch.device("meta"):
        disc = PixelDiscriminator(backbone, head_channels=cfg.disc_head_channels, head=cfg.disc_head)
    disc = disc.to(family.dtype)
    disc.backbone.to(family.frozen_dtype)
    if cfg.model_gradient_checkpointing:
        disc.enable_gradient_checkpointing()
    return disc


def meta_roles(cfg, family) -> dict:
    """role -> module on the meta device, built by :func:`flashdmd.training.roles.build_roles` itself (dtypes,
    sharing, LoRA, gradient checkpointing as the run has them); the discriminator by :func:`_meta_disc`."""
    from flashdmd.training.roles import build_roles
    built = build_roles(dataclasses.replace(cfg, disc_kind="none"), family)
    roles = {"teacher": built.teacher, "student": built.student, "fake_score": built.fake_score,
             "text_encoders": nn.ModuleList([e for e in family.text_encoders if e is not None]), "vae": family.vae}
    roles["disc"] = _meta_disc(cfg, family, built.fake_score)
    return roles


# ---------------------------------------------------------------------------------------------------
# bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def weights_by_role(roles: dict) -> dict[str, int]:
    """Distinct parameter and buffer storages, each attributed to the first role (ROLE_ORDER) holding it."""
    seen, out = set(), {}
    for role in ROLE_ORDER:
        module = roles.get(role)
        total = 0
        for t in list(module.parameters()) + list(module.buffers()) if module is not None else []:
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += _nbytes(t)
        out[role] = total
    return out


def trainable_bytes(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _largest_trainable(module: nn.Module | None) -> int:
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad] if module is not None else []
    return max(sizes, default=0)


def adamw_state_bytes(module: nn.Module | None, device: str) -> int:
    """AdamW's state: exp_avg and exp_avg_sq like each trainable tensor; its ``step`` is a float32 scalar tensor
    on the CPU (not in device memory: neither capturable nor fused)."""
    if module is None:
        return 0
    params = [p for p in module.parameters() if p.requires_grad]
    return 2 * trainable_bytes(module) + (4 * len(params) if device == "cpu" else 0)


def optimizer_step_bytes(module: nn.Module | None, device: str) -> int:
    """Temporaries of one AdamW step: the multi-tensor (foreach) path on CUDA makes about one trainable-sized
    temporary; the per-tensor path on the CPU one tensor's."""
    return trainable_bytes(module) if device == "cuda" else _largest_trainable(module)


def _grad_bytes(modules) -> int:
    return sum(_nbytes(p.grad) for m in modules if m is not None for p in m.parameters() if p.grad is not None)


def _clear_grads(modules) -> None:
    for m in modules:
        if m is not None:
            for p in m.parameters():
                p.grad = None


# ---------------------------------------------------------------------------------------------------
# the traced phases


def _trace_context(cfg, family, roles, timesteps, n_dm, resolution):
    from flashdmd.training.rng import SampleRNG
    meta = torch.device("meta")
    ctx = SimpleNamespace(cfg=cfg, family=family, teacher=roles["teacher"], student=roles["student"],
                          fake_score=roles["fake_score"], disc=roles["disc"], timesteps=timesteps, n_dm=n_dm,
                          rng=SampleRNG(cfg.run_seed, 0, cfg.run_batch_size), resolution=resolution,
                          accelerator=SimpleNamespace(device=meta))
    shape = tuple(family.latent_shape(resolution, resolution))
    ctx.real_latents = lambda n: torch.empty((n,) + shape, device=meta, dtype=family.dtype)
    ctx.randn = lambda s: torch.empty(tuple(s), device=meta, dtype=family.dtype)
    ctx.t = lambda k, n: torch.full((n,), float(timesteps[k]), device=meta)
    return ctx


def _generator_phase(ctx, cond, uncond) -> list:
    """rollout(with_grad=True) of flashdmd.training.distill, then the backward. Traced at the last DM step k: the
    no-grad forwards before it (backward simulation) and after it (finishing to a clean sample) hold only
    transient memory, the same at every k, so one of each stands for all of them."""
    from flashdmd.diffusion.samplers import renoise
    from flashdmd.training import steps
    cfg, fam = ctx.cfg, ctx.family
    b = len(cond)
    flash = cfg.method == "flashdmd"
    k = ctx.n_dm - 1 if flash else 0
    z = ctx.randn((b,) + tuple(fam.latent_shape(ctx.resolution, ctx.resolution)))
    with torch.no_grad():  # one backward-simulation step stands for the k of them
        x_t = fam.predict(ctx.student, z, ctx.t(0, b), cond)[0] if k > 0 else z
    x0 = fam.predict(ctx.student, x_t, ctx.t(k, b), cond)[0]
    loss = cfg.dm_weight * steps.dm_loss_at(ctx, x0, cond, uncond).mean()
    x0_disc = x0
    if flash and ctx.disc is not None and ctx.n_dm < len(ctx.timesteps):
        j = ctx.n_dm
        x0_clean = steps.finish_to_clean(ctx, x0.detach(), k, cond)
        x_lo = renoise(x0_clean, None, ctx.timesteps[j], fam.schedule, stochastic=True, generator=ctx.rng)
        x0_disc = fam.predict(ctx.student, x_lo, ctx.t(j, b), cond)[0]
    if ctx.disc is not None:
        loss = loss + cfg.disc_gen_weight * steps.gan_generator_loss(ctx, x0_disc, cond).mean()
    loss.backward()
    return [ctx.student, ctx.fake_score, ctx.disc]


def _fake_score_phase(ctx, cond) -> list:
    from flashdmd.training import steps
    x0_fake = ctx.real_latents(len(cond))
    loss = steps.fake_score_loss(ctx, x0_fake, cond).mean()
    if ctx.cfg.disc_kind == "latent":
        loss = loss + ctx.cfg.disc_weight * steps.latent_disc_loss(ctx, ctx.real_latents(len(cond)), cond, x0_fake,
                                                                   cond).mean()
    loss.backward()
    return [ctx.fake_score, ctx.disc]


def _disc_phase(ctx, cond) -> list:
    from flashdmd.losses import d_loss
    from flashdmd.training import steps
    b = len(cond)
    with torch.no_grad():
        fake = ctx.family.decode_latents(ctx.real_latents(b))
    real = torch.empty_like(fake)
    text = steps.disc_text(ctx, cond)  # a text-conditioned head: both sides with a batch of pooled embeddings
    d_loss(ctx.disc(real, text), ctx.disc(fake, text), ctx.cfg.disc_loss).mean().backward()
    return [ctx.disc]


def _rl_phase(ctx, cond, reward, reference) -> list:
    """rl_step of flashdmd.training.stage2 at its first RL step index, then the backward."""
    from flashdmd.losses import lcm_step_log_prob, step_dpo_loss
    from flashdmd.training.stage2 import _repeat, candidates
    cfg, fam = ctx.cfg, ctx.family
    b = len(cond)
    k = cfg.rl_step_indices[0]
    x_t = ctx.randn((b,) + tuple(fam.latent_shape(ctx.resolution, ctx.resolution)))
    t = ctx.t(k, b)
    n = cfg.rl_num_candidates
    with torch.no_grad():
        x0 = fam.predict(ctx.student, x_t, t, cond)[0]
        cands, t_next = candidates(ctx, x0, k, n)
        t_score = t if getattr(reward, "scores_at", "next") == "current" else t_next
        prompts = {"prompts": ["a prompt"] * (n * b)} if getattr(reward, "needs_prompts", False) else {}
        scores = reward.score(cands.flatten(0, 1), t_score.repeat(n), _repeat(cond, n), **prompts).reshape(n, b)
        del scores  # argmax has no values on meta tensors: any two candidates are the pair's shapes
        x_w, x_l = cands[0], cands[1]
        x0_ref = fam.predict(reference, x_t, t, cond)[0]
    x0_pol = fam.predict(ctx.student, x_t, t, cond)[0]
    a, s = fam.schedule.alpha_sigma(t_next)
    step_dpo_loss(lcm_step_log_prob(x_w, x0_pol, a, s), lcm_step_log_prob(x_w, x0_ref, a, s),
                  lcm_step_log_prob(x_l, x0_pol, a, s), lcm_step_log_prob(x_l, x0_ref, a, s),
                  cfg.rl_beta, cfg.rl_ratio_clip).mean().backward()
    return [ctx.student]


def trace_phase(fn, *args) -> tuple[int, int, list]:
    """(peak bytes the phase's tensors reach, bytes of the gradients it leaves, the modules it updates)."""
    tracker = LiveBytes("meta")
    with fused_attention(), tracker:
        updated = fn(*args)
    grads = _grad_bytes({id(m): m for m in updated if m is not None}.values())
    return tracker.peak, grads, updated


# ---------------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Settings:
    processes: int = 1
    device: str = "cuda"
    device_memory: int | None = None
    strategy: str = "auto"


def parse_bytes(text: str) -> int:
    """'24GB' / '24 GiB' / '80G' / '24000MB' -> bytes (GB and G mean GiB here, as card sizes are quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise FlashDMDError(f"--device-memory {text!r}: give a size like 24GB, 80GiB or 24000MB")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan(cfg, settings: Settings | None = None, log=None) -> dict:
    """The memory plan of ``cfg`` (see the module docstring); a JSON-ready dict."""
    from flashdmd.training.distill import _student_steps
    s = settings or Settings()
    log = log or (lambda line: None)
    if s.device not in ("cuda", "cpu"):
        raise FlashDMDError(f"--device {s.device!r}: cuda or cpu")
    if s.processes < 1:
        raise FlashDMDError("--processes must be >= 1")
    runtime = CUDA_RUNTIME_BYTES if s.device == "cuda" else _rss_bytes()
    t0 = time.time()
    train, frozen = dtypes(cfg, s.device)
    family = meta_family(cfg.model_teacher, cfg.model_family, train, frozen)
    resolution = cfg.data_resolution or family.default_resolution
    family.use_resolution(resolution, resolution)
    timesteps, n_dm = _student_steps(cfg, family)
    roles = meta_roles(cfg, family)
    text_cache = bool(getattr(cfg, "model_text_cache", False))
    ctx = _trace_context(cfg, family, roles, timesteps, n_dm, resolution)

    b = cfg.run_batch_size
    tracker = LiveBytes("meta")
    with fused_attention(), tracker, torch.no_grad():
        cond = family.encode_prompts(["a prompt"] * b, resolution, resolution)
        uncond = family.null_conditioning(b, resolution, resolution)
    encode_peak = tracker.peak
    if text_cache:  # the encoders are gone; the cached embeddings are a batch's worth
        roles["text_encoders"] = nn.ModuleList()
        encode_peak = 0

    trainable = {"student": roles["student"], "fake_score": roles["fake_score"], "disc": roles["disc"]}
    phases = {}
    for name, fn, args, steps_roles in (
            ("generator", _generator_phase, (ctx, cond, uncond), ("student",)),
            ("fake_score", _fake_score_phase, (ctx, cond), ("fake_score",) + (("disc",) if cfg.disc_kind == "latent" else ())),
            ("disc", _disc_phase, (ctx, cond), ("disc",))):
        if name == "disc" and cfg.disc_kind != "pixel":
            continue
        peak, grads, updated = trace_phase(fn, *args)
        step_tmp = sum(optimizer_step_bytes(trainable[r], s.device) for r in steps_roles)
        phases[name] = {"traced_peak": peak, "gradients": grads, "optimizer_step": step_tmp, "roles": steps_roles}
        _clear_grads(updated)
    log(f"stage 1 traced in {time.time() - t0:.1f} s")

    weights = weights_by_role(roles)
    optimizer = {r: adamw_state_bytes(m, s.device) for r, m in trainable.items()}
    stage1 = _stage(weights, optimizer, phases, encode_peak)

    stage2 = None
    if cfg.rl_enabled:
        from flashdmd.training.roles import copy_sharing_frozen
        reference = copy_sharing_frozen(roles["student"]).requires_grad_(False).eval()
        reward = _meta_reward(cfg, family)
        if isinstance(reward, _MetaJudgeReward):
            reward.student.append(roles["student"])
            log(f"stage 2: {reward.untraced} are not traced (only its weights are counted)")
        roles2 = dict(roles, reference=reference, reward=reward)
        peak, grads, updated = trace_phase(_rl_phase, ctx, cond, reward, reference)
        _clear_grads(updated)
        weights2 = weights_by_role(roles2)
        optimizer2 = dict(optimizer, rl=adamw_state_bytes(roles["student"], s.device))
        phases2 = {"rl": {"traced_peak": peak, "gradients": grads,
                          "optimizer_step": optimizer_step_bytes(roles["student"], s.device), "roles": ("student",)}}
        stage2 = _stage(weights2, optimizer2, phases2, encode_peak)
        log(f"stage 2 traced in {time.time() - t0:.1f} s")

    strategies = {"single": _per_device(stage1, stage2, roles, trainable, "single", 1, runtime)}
    if s.processes > 1:
        strategies["ddp"] = _per_device(stage1, stage2, roles, trainable, "ddp", s.processes, runtime)
        strategies["fsdp2"] = _per_device(stage1, stage2, roles, trainable, "fsdp2", s.processes, runtime)
    chosen = s.strategy if s.strategy != "auto" else ("single" if s.processes == 1 else "ddp")
    if chosen not in strategies:
        raise FlashDMDError(f"--strategy {chosen}: with --processes {s.processes} choose from {sorted(strategies)}")
    peak = strategies[chosen]["peak_bytes_per_device"]
    out = {
        "peak_bytes_per_device": peak,
        "peak_gib_per_device": round(peak / GiB, 2),
        "strategy": chosen,
        "processes": s.processes,
        "device": s.device,
        "fits": None if s.device_memory is None else peak <= FIT_HEADROOM * s.device_memory,
        "device_memory_bytes": s.device_memory,
        "fits_cards_gb": {str(c): peak <= FIT_HEADROOM * c * GiB for c in CARDS_GB},
        "fit_headroom": FIT_HEADROOM,
        "split": strategies[chosen]["split"],
        "peak_phase": strategies[chosen]["peak_phase"],
        "strategies": strategies,
        "setting": {"teacher": str(family.path), "family": family.name, "method": cfg.method,
                    "resolution": resolution, "batch_size": b, "lora_rank": cfg.model_lora_rank,
                    "shared_base": cfg.model_lora_rank > 0 and cfg.model_shared_base,
                    "trainable_dtype": str(train).replace("torch.", ""),
                    "frozen_dtype": str(frozen).replace("torch.", ""),
                    "gradient_checkpointing": cfg.model_gradient_checkpointing, "text_cache": text_cache,
                    "disc_kind": cfg.disc_kind, "stage2": cfg.rl_enabled},
        "parameters": {r: sum(p.numel() for p in m.parameters()) for r, m in roles.items() if m is not None},
        "seconds": round(time.time() - t0, 1),
        "detail": {"stage1": stage1, "stage2": stage2},  # strategy-independent counts per phase (single process)
    }
    return out


class _MetaJudgeReward(nn.Module):
    """rl_judge on the meta device: the judge folder's stored weights as one meta buffer of their byte count (what
    it holds in memory, in the stored dtypes) and the candidates' student prediction and VAE decode traced; the
    judge's own activations are not traced (its backends are not built on the meta device): the plan says so."""

    scores_at = "next"
    needs_prompts = True

    def __init__(self, cfg, family):
        super().__init__()
        n = stored_weight_bytes(Path(cfg.rl_judge_model))
        self.register_buffer("judge_weights", torch.empty(n, dtype=torch.uint8, device="meta"))
        self.family, self.student = family, []  # the student: set by plan() (a list: not a submodule)
        self.untraced = f"the {cfg.rl_judge} judge's activations"

    def score(self, x_t, t, cond, prompts=None):
        b = x_t.shape[0]
        x0 = self.family.predict(self.student[0], x_t, t, cond)[0]
        self.family.decode_latents(x0)
        return torch.zeros(b, device=x_t.device)


def stored_weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in a folder's safetensors files, from their headers (nothing loaded)."""
    total = 0
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def _meta_reward(cfg, family):
    """The Stage-2 LRM as the run loads it (its lrm.json decides whether the backbone is the teacher itself,
    a full copy or a LoRA copy; LPO's LRM brings its own UNet and text encoders), on the meta device."""
    from flashdmd.networks.lpo_reward import LPORewardModel, is_lpo_folder
    from flashdmd.networks.reward import CONFIG_NAME, LatentRewardModel
    from flashdmd.training.stage2 import resolve_reward_model
    if cfg.rl_judge is not None:
        return _MetaJudgeReward(cfg, family)
    path = resolve_reward_model(cfg.rl_reward_model, family.name)
    if is_lpo_folder(path):
        return LPORewardModel.on_meta(path, family, cfg.rl_lpo_feature_cfg)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FlashDMDError(f"rl_reward_model {path}: no {CONFIG_NAME} (the folder `flashdmd reward train` writes)")
    c = io.read_json(config)
    with torch.device("meta"):
        model = LatentRewardModel(family, proj_dim=c["proj_dim"], hidden_dim=c["hidden_dim"],
                                  train_backbone=c["train_backbone"], taps=c["taps"],
                                  time_embed_dim=c["time_embed_dim"], feature_cfg_scale=c["feature_cfg_scale"],
                                  lora_rank=c.get("lora_rank", 8), teacher=c.get("teacher"))
    return model.requires_grad_(False).eval()


def _stage(weights, optimizer, phases, encode_peak) -> dict:
    """One stage's strategy-independent counts: weights by role, AdamW states by optimiser, each phase's traced
    peak / gradients / optimiser-step temporaries, the text encoders' forward (:func:`_per_device` combines them)."""
    return {"weights": weights, "optimizer": optimizer, "phases": phases, "encode_peak": encode_peak}


def _fsdp_transient(module: nn.Module | None) -> int:
    """Bytes gathered at once under FSDP2 per-block wrapping: the root unit (what no wrapped block holds) plus two
    wrapped blocks (the one computing and the one prefetched)."""
    if module is None:
        return 0
    blocks = [m for m in module.modules() if type(m).__name__ in FSDP_BLOCKS]
    in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
    root = sum(_nbytes(p) for p in module.parameters() if id(p) not in in_blocks)
    sizes = sorted((sum(_nbytes(p) for p in blk.parameters()) for blk in blocks), reverse=True)
    return root + sum(sizes[:2])


def _per_device(stage1, stage2, roles, trainable, strategy, n, runtime) -> dict:
    """Per-device bytes of each stage under ``strategy`` over ``n`` processes, with the per-role split at the peak."""
    out = {"stages": {}}
    for label, st in (("stage1", stage1), ("stage2", stage2)):
        if st is None:
            continue
        weights, optimizer = dict(st["weights"]), dict(st["optimizer"])
        extra, note = 0, ""
        if strategy == "ddp":
            extra = sum(trainable_bytes(m) for m in trainable.values())  # gradient buckets (gradient_as_bucket_view off)
            note = "DDP gradient buckets: one copy of every trainable tensor"
        elif strategy == "fsdp2":
            for r in ("student", "fake_score"):
                held = sum(_nbytes(p) for p in roles[r].parameters())  # sharded copies of every tensor they hold
                weights[r] = held // n
            for r in optimizer:
                optimizer[r] //= n
            extra = max(_fsdp_transient(roles["student"]), _fsdp_transient(roles["fake_score"]))
            note = ("FSDP2: student and fake score sharded (all tensors they hold, so under LoRA the teacher keeps its "
                    "own full base next to 2/N of it), gradients and AdamW states 1/N; gathered root unit + 2 blocks")
        phases = {}
        for name, p in st["phases"].items():
            grads = p["gradients"] // n if strategy == "fsdp2" else p["gradients"]
            step = p["optimizer_step"] // n if strategy == "fsdp2" else p["optimizer_step"]
            act = max(p["traced_peak"] - p["gradients"], 0)
            phases[name] = sum(weights.values()) + sum(optimizer.values()) + extra + runtime + max(
                act + grads, grads + step, st["encode_peak"])
        worst = max(phases, key=phases.get)
        p = st["phases"][worst]
        grads = p["gradients"] // n if strategy == "fsdp2" else p["gradients"]
        split = {r: {"weights": weights.get(r, 0), "gradients": 0, "optimizer": optimizer.get(r, 0), "activations": 0}
                 for r in ROLE_ORDER if r in weights}
        if "rl" in optimizer:
            split["student"]["optimizer"] += optimizer["rl"]
        owner = p["roles"][0] if p["roles"][0] in split else "student"
        split[owner]["gradients"] = grads
        transient = phases[worst] - sum(weights.values()) - sum(optimizer.values()) - extra - runtime - grads
        act = max(p["traced_peak"] - p["gradients"], 0)
        if act >= transient:  # the traced forward / backward decides the phase's peak
            split[owner]["activations"] = transient
        else:  # the optimiser step's temporaries (or the text encoders' forward) do
            split["transient"] = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "other": transient}
        split["runtime"] = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "other": runtime + extra}
        out["stages"][label] = {"peak_bytes": phases[worst], "peak_phase": worst, "per_phase": phases,
                                "split": split, "note": note}
    worst_stage = max(out["stages"], key=lambda k: out["stages"][k]["peak_bytes"])
    out["peak_bytes_per_device"] = out["stages"][worst_stage]["peak_bytes"]
    out["peak_phase"] = f"{worst_stage}/{out['stages'][worst_stage]['peak_phase']}"
    out["split"] = out["stages"][worst_stage]["split"]
    return out


def headline(result: dict) -> str:
    """One line for `distill`'s start and `plan`'s output."""
    split = result["split"]
    parts = {k: sum(v[k] for v in split.values() if k in v)
             for k in ("weights", "gradients", "optimizer", "activations", "other")}
    fits = ""
    if result.get("fits") is not None:
        fits = f"; fits {result['device_memory_bytes'] / GiB:.0f} GiB: {'yes' if result['fits'] else 'NO'}"
    cards = [c for c, ok in result["fits_cards_gb"].items() if ok]
    return (f"memory plan ({result['strategy']}, {result['processes']} process(es), {result['device']}): peak "
            f"{result['peak_bytes_per_device'] / GiB:.1f} GiB per device at {result['peak_phase']} -- weights "
            f"{parts['weights'] / GiB:.1f}, gradients {parts['gradients'] / GiB:.1f}, optimiser "
            f"{parts['optimizer'] / GiB:.1f}, activations {parts['activations'] / GiB:.1f}, runtime and temporaries "
            f"{parts['other'] / GiB:.1f} GiB{fits}; fits cards "
            f"of {', '.join(cards) + ' GB' if cards else 'none of 24/48/80/141 GB'}")


# ---------------------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="YAML preset (as for distill)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run uses (default 1)")
    p.add_argument("--strategy", default="auto", choices=("auto", "single", "ddp", "fsdp2"),
                   help="which plan the headline and peak_bytes_per_device give: auto = single for 1 process, "
                        "ddp for more; every strategy is in the JSON")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where the run will train: cuda (model_frozen_dtype auto -> bfloat16, 1 GiB runtime) or cpu "
                        "(auto -> model_dtype; this process's own resident size as the runtime floor)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="memory per device, e.g. 24GB, 80GiB: say "
                   "whether the run fits (its peak under 95 %% of it: fragmentation and workspaces are not planned)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full plan here")


def table(result: dict) -> str:
    """The per-role split at the peak, in GiB."""
    rows = ["role            weights  gradients  optimiser  activations  other"]
    for role, v in result["split"].items():
        vals = [v.get(k, 0) / GiB for k in ("weights", "gradients", "optimizer", "activations", "other")]
        if any(vals):
            rows.append(f"{role:<15} " + "  ".join(f"{x:>9.2f}" for x in vals))
    return "\n".join(rows)


def run(args) -> None:
    from flashdmd.training.config import DistillConfig
    cfg = DistillConfig.from_sources(args.config, args.set)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    result = plan(cfg, Settings(processes=args.processes, device=args.device, device_memory=memory,
                                strategy=args.strategy))
    print(headline(result))
    print(table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if result["fits"] is False:
        raise FlashDMDError(f"the run does not fit {args.device_memory} per device (plan: "
                            f"{result['peak_bytes_per_device'] / GiB:.1f} GiB); see the split above")
