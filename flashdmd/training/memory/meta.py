"""A run on the meta device: the run's own set-up -- its family loaded from config files alone
(:class:`flashdmd.families.Family` on the meta device), its roles built by
:func:`flashdmd.training.roles.build_roles` itself (dtypes, LoRA, sharing, gradient checkpointing, the discriminator
as the run has them), its Stage-2 reference and reward model as :mod:`flashdmd.training.stage2` builds them -- with two
stand-ins for what holds no tensors worth tracing: the real-image stream (batches of the run's shape) and a
preference judge (its stored weights' bytes)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flashdmd.families import counts_zero_t5_on, load_family
from flashdmd.training.memory.accounting import stored_weight_bytes
from flashdmd.training.rng import SampleRNG
from flashdmd.training.roles import build_roles, frozen_dtype, quantise_frozen
from flashdmd.training.setup import RunSetup, student_steps
from flashdmd.training.state import Run, TrainState

META = torch.device("meta")


def dtypes(cfg, device: str) -> tuple[torch.dtype, torch.dtype]:
    """(trainable dtype, frozen dtype) of the run on ``device``, as the run resolves them."""
    return getattr(torch, cfg.model_dtype), frozen_dtype(cfg, device)


class MetaImageStream:
    """The real-image stream's ``next_batch`` for a run on the meta device: (B, 3, R, R) float32 pixels on the host,
    as the stream gives them (the step moves them to the device), with a caption each."""

    def __init__(self, batch: int, resolution: int):
        self.batch, self.resolution = batch, resolution

    def next_batch(self) -> tuple[torch.Tensor, list[str]]:
        return torch.empty((self.batch, 3, self.resolution, self.resolution)), ["a caption"] * self.batch


class MetaJudge(nn.Module):
    """``rl_judge`` on the meta device: the judge folder's stored weights as one meta buffer of their byte count (what
    it holds in memory, in the stored dtypes); its scores are zeros. The judge's own activations are not traced (its
    backends are not built on the meta device): the plan says so."""

    def __init__(self, cfg):
        super().__init__()
        n = stored_weight_bytes(Path(cfg.rl_judge_model))
        self.register_buffer("judge_weights", torch.empty(n, dtype=torch.uint8, device="meta"))
        self.untraced = f"the {cfg.rl_judge} judge's activations"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.judge_weights.narrow(0, 0, 0)  # a view (no bytes): the plan's residency sees the judge read
        return torch.zeros(images.shape[0], device=images.device)


def meta_family(spec: str, family: str | None, dtype: torch.dtype, frozen: torch.dtype):
    """The teacher's :class:`~flashdmd.families.Family` with every network on the meta device: latents in ``dtype``,
    loaded parts in ``frozen``."""
    return load_family(spec, family=family, device=META, dtype=dtype, frozen_dtype=frozen)


def meta_run(cfg, device: str) -> Run:
    """The run of ``cfg`` as it would be on ``device`` ("cuda" / "cpu": the dtypes it resolves), on the meta device:
    its set-up built as :func:`flashdmd.training.setup.build` builds it, without weights, data or evaluator."""
    train, frozen = dtypes(cfg, device)
    family = meta_family(cfg.model_teacher, cfg.model_family, train, frozen)
    quantise_frozen(cfg, family)  # as the run quantises them: the plan counts the quantised tensors' bytes
    resolution = cfg.data_resolution or family.default_resolution
    family.use_resolution(resolution, resolution)
    family.embedded_guidance = cfg.model_embedded_guidance
    # auto resolves by the device the forwards run on: here the planned run's, not meta
    family.zero_t5 = "counted" if counts_zero_t5_on(cfg.model_zero_t5, device) else "padded"
    timesteps, n_dm = student_steps(cfg, family)
    roles = build_roles(cfg, family)
    setup = RunSetup(cfg=cfg, accelerator=None, device=META, family=family, teacher=roles.teacher,
                     student=roles.student, fake_score=roles.fake_score, disc=roles.disc, timesteps=timesteps,
                     n_dm=n_dm, resolution=resolution, prompts=None, real=MetaImageStream(cfg.run_batch_size, resolution),
                     evaluator=None)
    return Run(setup, TrainState(rng=SampleRNG(cfg.run_seed, 0, cfg.run_batch_size)))


def role_modules(run: Run, judge: nn.Module | None = None) -> dict:
    """role -> module, as the accounting attributes storages (ROLE_ORDER)."""
    s = run.setup
    roles = {"teacher": s.teacher, "student": s.student, "fake_score": s.fake_score,
             "text_encoders": nn.ModuleList([e for e in s.family.text_encoders if e is not None]),
             "vae": s.family.vae, "disc": s.disc}
    if s.reference is not None:
        roles.update(reference=s.reference, reward=judge if judge is not None else s.reward)
    return roles


def meta_roles(cfg, family) -> dict:
    """role -> module on the meta device, built by :func:`flashdmd.training.roles.build_roles` itself (dtypes,
    sharing, LoRA, gradient checkpointing, the discriminator as the run has them)."""
    built = build_roles(cfg, family)
    return {"teacher": built.teacher, "student": built.student, "fake_score": built.fake_score,
            "text_encoders": nn.ModuleList([e for e in family.text_encoders if e is not None]), "vae": family.vae,
            "disc": built.disc}
