"""Stage 2's reward: a latent reward model (flashdmd's own LRM or LPO's released one) or a preference model on
images (:class:`JudgeReward`), found, checked at set-up and loaded when Stage 2 starts.

A reward model answers ``score(x_t, t, cond[, prompts]) -> (N,)`` for N noisy candidate latents; its attributes
``scores_at`` ("next": at the candidates' own timestep t' -- flashdmd's LRM, the judges; "current": at the step's
t -- LPO's) and ``needs_prompts`` tell :func:`flashdmd.training.stage2.rl_loss` what to give it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flashdmd import FlashDMDError, plugins
from flashdmd.evaluation.judges import load_judge
from flashdmd.networks.lpo_reward import LPORewardModel, check_lpo_folder, is_lpo_folder
from flashdmd.networks.quant import quantise
from flashdmd.networks.reward import LatentRewardModel
from flashdmd.training import residency, steps


def resolve_reward_model(spec: str, family_name: str) -> Path:
    """``rl_reward_model`` -> the LRM folder: a plug-in's (``world``: the shipped LRM of the family's teacher) or a
    path. The folder's contents are checked by :func:`load_reward_model` at start."""
    if plugins.find(spec) is not None:
        return Path(plugins.provider(spec, "reward_model", "rl_reward_model")(family_name))
    return Path(spec).expanduser()


def load_reward_model(path: Path, family, cfg, check_only: bool = False):
    """The reward model in ``path``, by its layout: LPO's released LRM (``state_dict.pt`` + ``unet/``; see
    :mod:`flashdmd.networks.lpo_reward`) or flashdmd's own (``lrm.json``). ``check_only``: check what can be
    checked without loading a multi-GB LPO model (flashdmd's own is loaded: small and fully checked so). On a
    family whose networks are on the meta device (`flashdmd plan`): the same model without its weights."""
    meta = family.device.type == "meta"
    if is_lpo_folder(path):
        if check_only:
            return check_lpo_folder(path, family)
        if meta:
            return LPORewardModel.on_meta(path, family, cfg.rl_lpo_feature_cfg)
        return LPORewardModel.load(path, family, feature_cfg=cfg.rl_lpo_feature_cfg)
    if meta:
        return LatentRewardModel.on_meta(path, family)
    return LatentRewardModel.load(path, family)


def check_reward_model(cfg, family) -> Path | None:
    """With Stage 2 enabled: the LRM folder, loaded once here (it must fit the teacher's family, weights and
    feature taps) and dropped again; Stage 2 loads it when it starts. One-line errors say how to get one."""
    if not cfg.rl_enabled:
        return None
    if cfg.rl_judge is not None:  # a preference model on images: its folder is checked by loading it once
        load_judge(cfg.rl_judge, cfg.rl_judge_model)
        return Path(cfg.rl_judge_model)
    plugin = plugins.find(cfg.rl_reward_model)
    if plugin is not None and plugins.model_owner(family.path) is not plugin:
        raise FlashDMDError(
            f"rl_reward_model {cfg.rl_reward_model!r} provides reward models for its own teachers only, not for "
            f"{cfg.model_teacher}: make preference pairs with `flashdmd reward make-pairs --model {cfg.model_teacher} "
            "--prompts FILE --judge pickscore --judge-model DIR --num 20000 --out pairs.jsonl`, train one with "
            f"`flashdmd reward train --pairs pairs.jsonl --family-model {cfg.model_teacher} --out lrm/`, and set "
            "rl_reward_model=lrm/ (docs/PAIRS.md)")
    path = resolve_reward_model(cfg.rl_reward_model, family.name)
    if not path.is_dir():
        raise FlashDMDError(f"rl_reward_model {path} does not exist: give the folder `flashdmd reward train` wrote "
                            "or LPO's LRM folder (docs/PAIRS.md)")
    load_reward_model(path, family, cfg, check_only=True)  # family, fingerprint, taps and weights checked here
    return path


def reward_model(run, judge=None) -> torch.nn.Module:
    """The run's Stage-2 reward, frozen, on the run's device: ``rl_judge`` (``judge``: an already built judge, as
    `flashdmd plan` passes one on the meta device) or the LRM of ``rl_reward_model``."""
    cfg, device = run.setup.cfg, run.setup.device
    if cfg.rl_judge is not None:
        judge = judge if judge is not None else load_judge(cfg.rl_judge, cfg.rl_judge_model, device=device)
        return JudgeReward(judge, run, cfg.rl_judge_image)
    path = resolve_reward_model(cfg.rl_reward_model, run.setup.family.name)
    net = load_reward_model(path, run.setup.family, cfg).requires_grad_(False).eval()
    off = run.setup.offload
    if off is None:
        net = net.to(device)
    # its own layers: the teacher's and the text encoders' (which an LRM may share) follow their own fields
    net = quantise(net, cfg.rl_reward_quant, keep=(run.setup.teacher, *filter(None, run.setup.family.text_encoders)))
    if off is not None:  # model_offload: its own frozen tensors homed, the teacher's streamed blocks hooked
        residency.add_part(off, "reward", net, run.setup.teacher)
        residency.hook(off, [net])
        off.place(net)
    return net


class JudgeReward(torch.nn.Module):
    """Stage 2's reward from a preference model on images (PickScore, HPSv2, ImageReward, CLIP; see
    :mod:`flashdmd.evaluation.judges`): each candidate latent x_t' becomes an image -- the student's x0 prediction at
    t' (``image`` "predict") or its remaining steps from t' ("finish") -- which the VAE decodes and the judge scores
    against its prompt. Frozen; the judge is held as a plain attribute (its weights are not this module's)."""

    scores_at = "next"
    needs_prompts = True

    def __init__(self, judge, run, image: str = "predict"):
        super().__init__()
        self.judge, self.image = judge, image
        self._run = [run]  # not a submodule: the student and VAE belong to their roles

    @torch.no_grad()
    def score(self, x_t: torch.Tensor, t: torch.Tensor, cond, prompts: list[str] | None = None) -> torch.Tensor:
        run = self._run[0]
        fam, b, timesteps = run.setup.family, run.setup.cfg.run_batch_size, run.setup.timesteps
        if prompts is None or len(prompts) != x_t.shape[0]:
            raise FlashDMDError("the judge reward needs one prompt per candidate")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        # the student step nearest to t' (on the meta device t has no value: its first step)
        j = 0 if t.device.type == "meta" else min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - float(t[0])))
        scores = []
        for s in range(0, x_t.shape[0], b):  # one batch of candidates at a time through student, VAE and judge
            c = cond[s:s + b]
            x0 = fam.predict(run.setup.student, x_t[s:s + b], t[s:s + b], c)[0]
            if self.image == "finish":
                x0 = steps.finish_to_clean(run, x0, j, c)
            scores.append(self.judge.score(fam.decode_latents(x0).float().clamp(-1, 1), list(prompts[s:s + b])))
        return torch.cat(scores).to(x_t.device, torch.float32)
