"""Stage 2 ranked by a preference model on images (issue 17, item 4: rl_judge), for a teacher with no LRM: the
judge sees each candidate as the image the student makes of it, the pair is the judge's best and worst, the
planner counts the judge's weights, and bad settings are one-line errors."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.training import stage2, steps  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judge")
    return {"sdxl": tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl"),
            "sd3": tm.save_pipeline(tm.sd3_pipeline(tmp), tmp / "sd3"), "clip": tm.clip_model_folder(tmp / "clip")}


def _cfg(folders, fam, **kw):
    base = dict(model_teacher=str(folders[fam]), run_batch_size=2, run_max_steps=1, disc_kind="none",
                eval_every_steps=0,
                run_sample_every_steps=0, run_checkpoint_every_steps=0, run_log_every_steps=1, rl_enabled=True,
                    rl_steps=2,
                rl_distill_ratio=2, rl_num_candidates=3, rl_judge="clip", rl_judge_model=str(folders["clip"]),
                rl_reward_model="/nowhere")  # unused with a judge
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize("fam", ["sdxl", "sd3"])
def test_the_pair_is_the_judges_best_and_worst_of_the_students_images(folders, fam, tmp_path, monkeypatch):
    cfg = _cfg(folders, fam)
    ctx = setup(cfg)
    checked = []
    real_pick = stage2.pick_pair

    def spy_pick(scores, cands):
        # recompute independently: the student's x0 of every candidate at t', decoded, scored by the judge -- b
        # candidates at a time, as the run does, so bitwise the same computation. (Not a float bound: the judge
        # quantises images to 8 bits first, so another batch size's 1-ulp differences in x0 can move a pixel by a
        # whole level, 1/255, and a score by ~1e-4 of itself; 1.8e-3 of 15 was measured on two CPU kinds.)
        from flashdmd.families import Conditioning
        k1 = ctx.timesteps.index(next(t for t in ctx.timesteps if float(t) == spy_pick.t_next))
        n, b = cands.shape[:2]
        flat = cands.flatten(0, 1)
        conds, prompts = Conditioning.cat([spy_pick.cond] * n), spy_pick.prompts * n
        want = []
        for s in range(0, n * b, b):
            t = torch.full((b,), float(ctx.timesteps[k1]))
            x0 = ctx.family.predict(ctx.student, flat[s:s + b], t, conds[s:s + b])[0]
            images = ctx.family.decode_latents(x0).float().clamp(-1, 1)
            want.append(ctx.reward.judge.score(images, prompts[s:s + b]))
            checked.append(images.shape)
        want = torch.cat(want).reshape(n, b)
        assert torch.equal(scores.cpu(), want)
        # ... and the pair is the candidate each judge score ranks first and last
        winner, loser = real_pick(scores, cands)
        idx = torch.arange(b)
        assert torch.equal(winner, cands[want.argmax(0), idx]) and torch.equal(loser, cands[want.argmin(0), idx])
        return winner, loser

    real_rl_step, real_candidates = stage2.rl_step, stage2.candidates

    def spy_rl_step(c, cond, prompts=None):
        spy_pick.cond, spy_pick.prompts = cond, list(prompts)
        return real_rl_step(c, cond, prompts)

    def spy_candidates(c, x0, k, n):
        cands, t_next = real_candidates(c, x0, k, n)
        spy_pick.t_next = float(t_next[0])
        return cands, t_next
    monkeypatch.setattr(stage2, "pick_pair", spy_pick)
    monkeypatch.setattr(stage2, "rl_step", spy_rl_step)
    monkeypatch.setattr(stage2, "candidates", spy_candidates)
    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert result["rl_steps"] == 2
    res = ctx.resolution
    assert len(checked) == 2 * 3 and all(s == (2, 3, res, res) for s in checked)
    assert isinstance(ctx.reward, stage2.JudgeReward)


def test_finish_runs_the_students_remaining_steps(folders, monkeypatch):
    cfg = _cfg(folders, "sdxl", rl_judge_image="finish", rl_step_indices=[0])
    ctx = setup(cfg)
    stage2.setup_stage2(ctx)
    calls = []
    real = steps.finish_to_clean

    def spy(c, x0, k, cond):
        calls.append(k)
        return real(c, x0, k, cond)
    monkeypatch.setattr(steps, "finish_to_clean", spy)
    from flashdmd.training.distill import _encode
    prompts = ["a shoe", "a bag"]
    stage2.rl_step(ctx, _encode(ctx, prompts), prompts)
    assert calls and set(calls) == {1}  # the candidates sit at step 1 (t'): the student finishes from there


def test_judge_settings_are_checked(folders, tmp_path):
    with pytest.raises(FlashDMDError, match="rl_judge and rl_judge_model go together"):
        _cfg(folders, "sdxl", rl_judge_model=None)
    with pytest.raises(FlashDMDError, match="rl_judge must be pickscore"):
        _cfg(folders, "sdxl", rl_judge="aesthetic")
    with pytest.raises(FlashDMDError, match="rl_judge_image must be predict or finish"):
        _cfg(folders, "sdxl", rl_judge_image="decode")
    with pytest.raises(FlashDMDError, match="folder .* not found"):  # before Stage 1: a wrong judge folder
        train(_cfg(folders, "sdxl", rl_judge_model=str(tmp_path / "nowhere")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_counts_the_judges_stored_weights(folders):
    from safetensors.torch import load_file

    from flashdmd.training.plan import MetaJudge
    meta = MetaJudge(_cfg(folders, "sdxl"))
    stored = sum(t.numel() * t.element_size() for f in folders["clip"].glob("*.safetensors")
                 for t in load_file(str(f)).values())
    assert sum(b.numel() for b in meta.buffers()) == stored > 0


def test_the_whole_plan_runs_with_a_judge(folders):
    from flashdmd.training import plan as P
    lines = []
    cfg = _cfg(folders, "sdxl")
    planned = P.plan(cfg, P.Settings(device="cpu"), log=lines.append)["detail"]["stage2"]
    assert planned["weights"]["reward"] == P.stored_weight_bytes(folders["clip"])
    assert any("judge's activations are not traced" in line for line in lines)
