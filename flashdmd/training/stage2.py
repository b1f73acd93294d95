"""Stage 2: joint reinforcement learning -- step-level DPO at the high-noise student steps, scored by a
latent reward model (LRM), alternating with continued Stage-1 distillation.

One RL update (``rl_step``):
    k ~ rl_step_indices (high-noise steps; paper 999, 749)   x_t = backward simulation to step k
    x0 = student(x_t)  (no grad)        K candidates  x'_i = alpha' x0 + sigma' n_i   (LCM step, fresh n_i)
    LRM scores the K noisy candidates at t' -> winner x_w (best), loser x_l (worst)
    H = [log p_theta(x_w) - log p_ref(x_w)] - [log p_theta(x_l) - log p_ref(x_l)],  L = -log sigmoid(beta H)
with p(x' | x_t) = N(alpha' x0_model(x_t), sigma'^2 I) and the reference = the student frozen at the start of
Stage 2. Every ``rl_distill_ratio`` RL updates one Stage-1 iteration runs (generator + fake score + disc):
the ongoing distillation is the regulariser against reward hacking. ``rl_kl_weight`` adds the alternative one,
an explicit KL penalty to the reference: L += rl_kl_weight * beta * KL(p_theta(. | x_t) || p_ref(. | x_t)).
"""
from __future__ import annotations

from pathlib import Path

import torch

from flashdmd import FlashDMDError, plugins
from flashdmd.families import name_part
from flashdmd.losses import lcm_step_log_prob, step_dpo_loss, step_kl
from flashdmd.training import steps


def resolve_reward_model(spec: str, family_name: str) -> Path:
    """``rl_reward_model`` -> the LRM folder: a plug-in's (``world``: the shipped LRM of the family's teacher) or a
    path. The folder's contents are checked by :func:`load_reward_model` at start."""
    if plugins.find(spec) is not None:
        return Path(plugins.provider(spec, "reward_model", "rl_reward_model")(family_name))
    return Path(spec).expanduser()


class JudgeReward(torch.nn.Module):
    """Stage 2's reward from a preference model on images (PickScore, HPSv2, ImageReward, CLIP; see
    :mod:`flashdmd.evaluation.judges`): each candidate latent x_t' becomes an image -- the student's x0 prediction at
    t' (``image`` "predict") or its remaining steps from t' ("finish") -- which the VAE decodes and the judge scores
    against its prompt. Frozen; the judge is held as a plain attribute (its weights are not this module's)."""

    scores_at = "next"
    needs_prompts = True

    def __init__(self, judge, ctx, image: str = "predict"):
        super().__init__()
        self.judge, self.image = judge, image
        self._ctx = [ctx]  # not a submodule: the student and VAE belong to their roles

    @torch.no_grad()
    def score(self, x_t: torch.Tensor, t: torch.Tensor, cond, prompts: list[str] | None = None) -> torch.Tensor:
        ctx = self._ctx[0]
        fam, b = ctx.family, ctx.cfg.run_batch_size
        if prompts is None or len(prompts) != x_t.shape[0]:
            raise FlashDMDError("the judge reward needs one prompt per candidate")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        j = min(range(len(ctx.timesteps)), key=lambda i: abs(ctx.timesteps[i] - float(t[0])))
        scores = []
        for s in range(0, x_t.shape[0], b):  # one batch of candidates at a time through student, VAE and judge
            c = cond[s:s + b]
            x0 = fam.predict(ctx.student, x_t[s:s + b], t[s:s + b], c)[0]
            if self.image == "finish":
                x0 = steps.finish_to_clean(ctx, x0, j, c)
            scores.append(self.judge.score(fam.decode_latents(x0).float().clamp(-1, 1), list(prompts[s:s + b])))
        return torch.cat(scores).to(x_t.device, torch.float32)


def load_reward_model(path: Path, family, cfg, check_only: bool = False):
    """The reward model in ``path``, by its layout: LPO's released LRM (``state_dict.pt`` + ``unet/``; see
    :mod:`flashdmd.networks.lpo_reward`) or flashdmd's own (``lrm.json``). ``check_only``: check what can be
    checked without loading a multi-GB LPO model (flashdmd's own is loaded: small and fully checked so)."""
    from flashdmd.networks.lpo_reward import LPORewardModel, check_lpo_folder, is_lpo_folder
    from flashdmd.networks.reward import LatentRewardModel
    if is_lpo_folder(path):
        if check_only:
            return check_lpo_folder(path, family)
        return LPORewardModel.load(path, family, feature_cfg=cfg.rl_lpo_feature_cfg)
    return LatentRewardModel.load(path, family)


def setup_stage2(ctx) -> None:
    """Freeze the reference policy, load the LRM, give RL its own optimiser state."""
    cfg, acc = ctx.cfg, ctx.accelerator
    K = len(ctx.timesteps)
    bad = [i for i in cfg.rl_step_indices if i + 1 >= K]
    if bad:
        raise FlashDMDError(f"config: rl_step_indices {bad} have no next student step (K = {K}); use indices < {K - 1}")
    from flashdmd.training.parallel import is_sharded, replica
    # the frozen reference: a plain copy on every rank (under FSDP gathered from the shards)
    ref = replica(ctx, ctx.student, all_ranks=True)
    # under LoRA the copy shares the student's frozen base (the teacher's): only the adapters are copied
    from flashdmd.training.roles import copy_sharing_frozen
    ctx.reference = (ref if is_sharded(ctx.student) else copy_sharing_frozen(ref)).requires_grad_(False).eval()
    name_part(ctx.reference, "Stage-2 reference")
    if cfg.rl_judge is not None:
        from flashdmd.evaluation.judges import load_judge
        ctx.reward = JudgeReward(load_judge(cfg.rl_judge, cfg.rl_judge_model, device=acc.device), ctx,
                                 cfg.rl_judge_image)
    else:
        path = resolve_reward_model(cfg.rl_reward_model, ctx.family.name)
        ctx.reward = load_reward_model(path, ctx.family, cfg).to(acc.device).requires_grad_(False).eval()
    params = [p for p in ctx.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl_lr or cfg.student_lr, betas=tuple(cfg.optim_betas),
                            weight_decay=cfg.optim_weight_decay)
    ctx.opt["rl"] = acc.prepare(opt)  # the student is prepared already: this only wraps the optimiser
    ctx.sched["rl"] = torch.optim.lr_scheduler.LambdaLR(ctx.opt["rl"], lambda _: 1.0)


@torch.no_grad()
def candidates(ctx, x0, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n LCM-step candidates of the next latent (n, B, C, h, w) and the next timestep (B,)."""
    b = x0.shape[0]
    t_next = ctx.t(k + 1, b)
    a, s = ctx.family.schedule.alpha_sigma(t_next)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    noise = torch.stack([ctx.rng.randn_like(x0) for _ in range(n)])
    return a.reshape(shape).to(x0.dtype) * x0 + s.reshape(shape).to(x0.dtype) * noise, t_next


@torch.no_grad()
def pick_pair(scores: torch.Tensor, cands: torch.Tensor):
    """scores (n, B), cands (n, B, ...) -> (winner, loser) (B, ...), best and worst per sample."""
    idx = torch.arange(scores.shape[1], device=scores.device)
    return cands[scores.argmax(0), idx], cands[scores.argmin(0), idx]


def rl_step(ctx, cond, prompts: list[str] | None = None) -> dict:
    """One RL update on a batch of conditionings (and their prompts, which a reward model with its own text
    encoders -- LPO's -- needs)."""
    cfg, fam = ctx.cfg, ctx.family
    b = len(cond)
    k = cfg.rl_step_indices[ctx.rng.shared_randrange(len(cfg.rl_step_indices))]
    res = ctx.resolution
    z = ctx.randn((b,) + tuple(fam.latent_shape(res, res)))
    x_t = steps.student_input(ctx, z, k, cond)
    t = ctx.t(k, b)
    with torch.no_grad():
        x0 = fam.predict(ctx.student, x_t, t, cond)[0]
        cands, t_next = candidates(ctx, x0, k, cfg.rl_num_candidates)
        flat = cands.flatten(0, 1)
        # flashdmd's LRM scores x_{t'} at t' (what it was trained on); LPO's at the step's own t, as LPO does
        t_score = t if getattr(ctx.reward, "scores_at", "next") == "current" else t_next
        if getattr(ctx.reward, "needs_prompts", False) and prompts is None:
            raise FlashDMDError(f"{type(ctx.reward).__name__} scores against the prompts: pass them to rl_step")
        scores = ctx.reward.score(flat, t_score.repeat(cfg.rl_num_candidates), _repeat(cond, cfg.rl_num_candidates),
                                  **({"prompts": list(prompts) * cfg.rl_num_candidates}
                                     if getattr(ctx.reward, "needs_prompts", False) else {}))
        scores = scores.reshape(cfg.rl_num_candidates, b)
        x_w, x_l = pick_pair(scores, cands)
        x0_ref = fam.predict(ctx.reference, x_t, t, cond)[0]
    x0_pol = fam.predict(ctx.student, x_t, t, cond)[0]
    a, s = fam.schedule.alpha_sigma(t_next)
    dpo = step_dpo_loss(lcm_step_log_prob(x_w, x0_pol, a, s), lcm_step_log_prob(x_w, x0_ref, a, s),
                        lcm_step_log_prob(x_l, x0_pol, a, s), lcm_step_log_prob(x_l, x0_ref, a, s),
                        cfg.rl_beta, cfg.rl_ratio_clip).mean()
    kl = step_kl(x0_pol, x0_ref, a, s).mean()   # logged always: how far RL has moved the policy at this state
    loss = dpo + cfg.rl_kl_weight * cfg.rl_beta * kl if cfg.rl_kl_weight > 0 else dpo
    from flashdmd.training.distill import _optimise, after_student_update
    params = [p for g in ctx.opt["rl"].param_groups for p in g["params"]]
    norm = _optimise(ctx, "rl", loss, params)
    after_student_update(ctx)
    return {"rl/loss": loss.item(), "rl/lrm_score": scores.mean().item(),
            "rl/lrm_margin": (scores.max(0).values - scores.min(0).values).mean().item(), "rl/kl": kl.item(),
            "rl/dpo": dpo.item(),
            f"rl/loss_t{int(round(ctx.timesteps[k]))}": loss.item(), "grad_norm/rl": float(norm)}


def _repeat(cond, n: int):
    """Conditioning for n stacked copies of the batch (candidate-major order)."""
    from flashdmd.families import Conditioning
    return Conditioning.cat([cond] * n)
