"""LPO's released latent reward model in its own folder layout (issue 17, item 1): detected from the folder's
contents, scored exactly as LPO's SDXLBasePreferenceModel.get_preference_score (pinned against an independent
transcription of LPO's formula on a tiny random model), used by Stage 2 at the step's own timestep, counted by the
planner, and refused with one-line errors when it cannot be used."""
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.networks.lpo_reward import LPORewardModel, check_lpo_folder, is_lpo_folder  # noqa: E402
from tolerances import U32, assert_close, network_factor  # noqa: E402


def _score_factor(model, cfg_scale: float) -> float:
    """float32 round-off of a score relative to exp(logit_scale), where our path and LPO's may differ: the feature
    CFG (|w| + |w - 1| of the pooled features), the projection (fan-in u), the two norms and the dot product of the
    P projected dimensions (2 P u)."""
    p = model.visual_projection.out_features
    return network_factor(model.visual_projection) + 2 * p + 2 * (abs(cfg_scale) + abs(cfg_scale - 1)) + 4

CH = (16, 24, 32)  # three down blocks of two resnets: down_block_res_samples has 9 entries, LPO taps 2, 5, 8


def lpo_unet(seed: int = 3):
    """An SDXL-layout UNet (3 down blocks, 2 layers each, text_time) that takes the tiny teacher's conditioning."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=CH, layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + tm.TEXT_PROJ, cross_attention_dim=2 * tm.TEXT_HIDDEN)


def write_lpo(folder: Path, *, encoders: bool = True, in_features: int | None = None, scale=2.1) -> Path:
    """LPO's save(): unet/, text_encoder/, text_encoder_2/ (fine-tuned: fresh random ones here) and state_dict.pt."""
    folder.mkdir(parents=True)
    lpo_unet().save_pretrained(folder / "unet", safe_serialization=True)
    if encoders:
        tok = tm.clip_tokenizer(folder.parent / f"{folder.name}_vocab")
        te1, te2 = tm.clip_encoders(len(tok), tok.bos_token_id, tok.eos_token_id, seed=77)
        te1.save_pretrained(folder / "text_encoder", safe_serialization=True)
        te2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    n = in_features if in_features is not None else CH[0] + CH[1] + CH[2] + CH[2]
    g = torch.Generator().manual_seed(5)
    torch.save({"visual_projection": {"weight": torch.randn(tm.TEXT_PROJ, n, generator=g) * 0.02}, "logit_scale": scale},
               folder / "state_dict.pt")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpo")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    return {"teacher": teacher, "lpo": write_lpo(tmp / "lpo"), "frozen": write_lpo(tmp / "frozen", encoders=False),
            "single": write_lpo(tmp / "single", in_features=CH[2]), "sd3": tm.save_pipeline(tm.sd3_pipeline(tmp),
                                                                                          tmp / "sd3")}


def lpo_reference(folder: Path, teacher: Path, x, t, prompts, cfg_scale=7.5):
    """LPO's get_preference_score transcribed on the UNet's own blocks (its forward with use_up_blocks=False):
    text features with "" as the unconditional prompt, [x; x] through conv_in, the down blocks and the mid block,
    GAP of res samples 2, 5, 8 (conditional half) and of the mid block with feature CFG, projection, cosine."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    src = folder if (folder / "text_encoder").is_dir() else teacher
    te1 = CLIPTextModel.from_pretrained(src / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2")
    tok1 = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(teacher / "tokenizer_2")
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    w, scale = state["visual_projection"]["weight"], torch.tensor(float(state["logit_scale"]))
    do_cfg = cfg_scale > 1.0
    ids = lambda tok, p: tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                             return_tensors="pt").input_ids
    b = len(prompts)
    i1, i2 = ids(tok1, prompts), ids(tok2, prompts)
    if do_cfg:
        i1 = torch.cat([i1, ids(tok1, [""]).repeat(b, 1)])
        i2 = torch.cat([i2, ids(tok2, [""]).repeat(b, 1)])
    o1, o2 = te1(i1, output_hidden_states=True), te2(i2, output_hidden_states=True)
    pooled = o2[0]
    ehs = torch.concat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    text = pooled.chunk(2)[0] if do_cfg else pooled
    x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if do_cfg else (x, t)
    size = unet.config.sample_size * 2 ** (len(load_family(teacher).vae.config.block_out_channels) - 1)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=ehs.dtype).repeat(x_in.shape[0], 1)
    with torch.no_grad():
        emb = unet.time_embedding(unet.get_time_embed(sample=x_in, timestep=t_in))
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs,
                                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        h = unet.conv_in(x_in)
        res = (h,)
        for blk in unet.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                h, r = blk(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, r = blk(hidden_states=h, temb=emb)
            res += r
        mid = unet.mid_block(h, emb, encoder_hidden_states=ehs)
        pool = lambda f: F.adaptive_avg_pool2d(f, 1).squeeze(3).squeeze(2)  # noqa: E731
        pm = pool(mid)
        if do_cfg:
            c, u = pm.chunk(2)
            pm = u + cfg_scale * (c - u)
        if w.shape[1] == pm.shape[1]:
            feats = pm
        else:
            taps = [pool(res[i]).chunk(2)[0] if do_cfg else pool(res[i]) for i in (2, 5, 8)]
            feats = torch.cat(taps + [pm], dim=-1)
        v = feats @ w.T
        v = v / torch.norm(v, dim=-1, keepdim=True)
        text = text / torch.norm(text, dim=-1, keepdim=True)
        return scale.exp() * (v * text).sum(dim=-1)


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 16, 16, generator=g), torch.tensor([999.0, 749.0, 250.0][:b]), \
        ["a red shoe", "a bag on a table", ""][:b]


@pytest.mark.parametrize("which,cfg_scale", [("lpo", 7.5), ("lpo", 1.0), ("frozen", 7.5), ("single", 7.5)])
def test_scores_match_lpos_formula(folders, which, cfg_scale):
    fam = load_family(folders["teacher"])
    assert is_lpo_folder(folders[which]) and not is_lpo_folder(folders["teacher"])
    model = LPORewardModel.load(folders[which], fam, feature_cfg=cfg_scale)
    x, t, prompts = _inputs()
    got = model.score(x, t, prompts=prompts)
    want = lpo_reference(folders[which], folders["teacher"], x, t, prompts, cfg_scale)
    # the same networks on the same batch (bitwise on every CPU measured); the head's float path may differ
    k, scale = _score_factor(model, cfg_scale), float(model.logit_scale.exp())
    assert_close(got, want, factor=k, mag=scale)
    # the scores depend on what LPO's formula depends on: the timestep and the prompt (beyond that round-off)
    assert (model.score(x, t.flip(0), prompts=prompts) - got).abs().max() > k * U32 * scale
    assert (model.score(x, t, prompts=prompts[::-1]) - got).abs().max() > k * U32 * scale


def test_fine_tuned_encoders_are_used_not_the_teachers(folders):
    fam = load_family(folders["teacher"])
    own, frozen = LPORewardModel.load(folders["lpo"], fam), LPORewardModel.load(folders["frozen"], fam)
    x, t, prompts = _inputs()
    assert check_lpo_folder(folders["lpo"], fam)["fine_tuned_text_encoders"]
    assert not check_lpo_folder(folders["frozen"], fam)["fine_tuned_text_encoders"]
    k, scale = _score_factor(own, own.feature_cfg), float(own.logit_scale.exp())
    assert (own.score(x, t, prompts=prompts) - frozen.score(x, t, prompts=prompts)).abs().max() > k * U32 * scale


def test_stage2_scores_lpo_candidates_at_the_steps_own_timestep(folders, tmp_path, monkeypatch):
    from flashdmd.training import stage2
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import train
    cfg = DistillConfig(model_teacher=str(folders["teacher"]), run_batch_size=2, run_max_steps=1, disc_kind="none",
                        eval_every_steps=0, run_sample_every_steps=0, run_checkpoint_every_steps=0,
                            run_log_every_steps=1,
                        rl_enabled=True, rl_reward_model=str(folders["lpo"]), rl_steps=2, rl_distill_ratio=2,
                        rl_num_candidates=3, rl_step_indices=[0, 1])
    calls = []
    real = LPORewardModel.score

    def spy(self, x_t, t, cond=None, prompts=None):
        calls.append((t.clone(), list(prompts)))
        return real(self, x_t, t, cond, prompts)
    monkeypatch.setattr(LPORewardModel, "score", spy)
    seen_k = []
    real_rl_step = stage2.rl_step

    def rl_spy(ctx, cond, prompts=None):
        out = real_rl_step(ctx, cond, prompts)
        seen_k.append(next(int(k.split("_t")[1]) for k in out if k.startswith("rl/loss_t")))
        assert isinstance(ctx.reward, LPORewardModel)
        return out
    monkeypatch.setattr(stage2, "rl_step", rl_spy)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["rl_steps"] == 2 and len(calls) == 2
    for (t, prompts), k_t in zip(calls, seen_k):
        assert t.numel() == 2 * 3 and torch.all(t == k_t)  # the step's own t for every candidate, as LPO
        assert len(prompts) == 6 and all(isinstance(p, str) for p in prompts)


def test_plan_counts_lpos_networks(folders):
    """The reward model Stage 2 loads, on the meta family `flashdmd plan` builds: LPO's networks without weights."""
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.plan import meta_family
    from flashdmd.training.reward_model import load_reward_model
    fam = load_family(folders["teacher"])
    cfg = DistillConfig(model_teacher=str(folders["teacher"]), rl_enabled=True, rl_reward_model=str(folders["lpo"]))
    on_meta = meta_family(cfg.model_teacher, None, torch.float32, torch.float32)
    meta, real = load_reward_model(Path(folders["lpo"]), on_meta, cfg), LPORewardModel.load(folders["lpo"], fam)
    shapes = lambda m: sorted((n, tuple(p.shape)) for n, p in m.state_dict().items())  # noqa: E731
    assert shapes(meta) == shapes(real) and next(meta.parameters()).is_meta


class _NotATensor:
    pass


def test_unusable_lpo_folders_are_one_line_errors(folders, tmp_path):
    fam = load_family(folders["teacher"])
    with pytest.raises(FlashDMDError, match="teacher is sd3"):
        check_lpo_folder(folders["lpo"], load_family(folders["sd3"]))
    bad = write_lpo(tmp_path / "wide", in_features=50)
    with pytest.raises(FlashDMDError, match="visual_projection takes 50 features"):
        check_lpo_folder(bad, fam)
    evil = write_lpo(tmp_path / "evil")
    (evil / "state_dict.pt").write_bytes(pickle.dumps({"visual_projection": _NotATensor(), "logit_scale": 1.0}))
    with pytest.raises(FlashDMDError, match="weights only"):  # never unpickled beyond weights_only
        check_lpo_folder(evil, fam)
    pickled = write_lpo(tmp_path / "bin")
    for f in (pickled / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(FlashDMDError, match="no .safetensors weights"):
        LPORewardModel.load(pickled, fam)
    (tmp_path / "trunc").mkdir()
    trunc = write_lpo(tmp_path / "trunc" / "m")
    (trunc / "state_dict.pt").write_bytes((trunc / "state_dict.pt").read_bytes()[:40])
    with pytest.raises(FlashDMDError, match="cannot read .*state_dict.pt"):
        check_lpo_folder(trunc, fam)
