"""Latent reward model, preference pairs and their training, on tiny random SDXL / SD3 models.

* LRM: score shapes, where gradients flow (heads; backbone only when it trains), save/load round trips
  (frozen pointer, full copy, LoRA) giving identical scores;
* the Bradley-Terry loss against its closed form; shared noise inside a pair;
* a known synthetic preference (prefer the latent with the larger mean) is learnt: held-out accuracy > 0.7;
* pairs files: orientation by ``preferred``, PNG samples VAE-encoded, one-line errors on bad input;
* the CLI: ``reward train`` end to end; ``reward make-pairs`` refuses a model of no plug-in without a judge
  (judges and the world's pairs: tests/test_pairs_real.py).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.cli import main
from flashdmd.families import load_family
from flashdmd.networks.reward import LatentRewardModel
from flashdmd.rewards.pairs import PairSet, load_pairs, read_records, write_pairs
from flashdmd.rewards.train import (NOISE_BANDS, PromptBank, bradley_terry_loss, noised_pair, pairwise_accuracy,
                                    split_indices, train_lrm)
import tiny_models as tm  # tests/ is on sys.path (pytest prepend import mode), as in test_families
from tolerances import U32, assert_close, fp32_bound, magnitude, network_factor, within

FAMILIES = ("sdxl", "sd3")
PROMPTS = ["a photo of a sneaker", "a small coat", "a centered bag"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrm_models")
    return {"sdxl": tm.save_pipeline(tm.sdxl_pipeline(root / "tok_sdxl"), root / "sdxl"),
            "sd3": tm.save_pipeline(tm.sd3_pipeline(root / "tok_sd3"), root / "sd3")}


@pytest.fixture(scope="module")
def families(folders):
    return {name: load_family(path) for name, path in folders.items()}


def _batch(fam, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    res = fam.default_resolution
    x = torch.randn((n,) + fam.latent_shape(res, res), generator=g)
    t = fam.schedule.sample_timesteps(n, 0.1, 0.9, generator=g).float()
    cond = fam.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    return x, t, cond


def _one_line(err) -> None:
    assert "\n" not in str(err.value) and str(err.value)


# ---------------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", [False, True, "lora"])
def test_score_shape_and_gradients(families, name, mode):
    fam = families[name]
    teacher_before = {k: v.clone() for k, v in fam.denoiser.state_dict().items()}
    torch.manual_seed(0)
    lrm = LatentRewardModel(fam, proj_dim=16, hidden_dim=32, train_backbone=mode)
    x, t, cond = _batch(fam)
    s = lrm.score(x, t, cond)
    assert s.shape == (2,) and torch.isfinite(s).all()
    # |cos| <= 1, up to the float32 round-off of two unit norms and a dot product of proj_dim terms (2 P + 4 u)
    assert s.abs().max() <= math.exp(lrm.logit_scale.item()) * (1 + (2 * 16 + 4) * U32)
    s.sum().backward()
    for n, p in lrm.named_parameters():
        if not n.startswith("backbone."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    back = [p for n, p in lrm.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    if mode is False:
        assert not back and lrm.backbone is fam.denoiser
    else:
        assert back and lrm.backbone is not fam.denoiser
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in back)
        if mode == "lora":
            assert all("lora_" in n for n, p in lrm.named_parameters() if n.startswith("backbone.") and p.requires_grad)
    for k, v in fam.denoiser.state_dict().items():  # the teacher is never touched
        assert torch.equal(v, teacher_before[k]), k
    assert all(not p.requires_grad for p in fam.denoiser.parameters())


def test_frozen_backbone_passes_gradient_to_the_latent(families):
    fam = families["sdxl"]
    lrm = LatentRewardModel(fam, proj_dim=16, hidden_dim=32)
    x, t, cond = _batch(fam)
    x.requires_grad_(True)
    lrm.score(x, t, cond).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_taps_match_family_features(families):
    """The early-stopping tap path gives exactly the adapter's feature maps."""
    for fam in families.values():
        lrm = LatentRewardModel(fam, proj_dim=8, hidden_dim=8)
        x, t, cond = _batch(fam)
        with torch.no_grad():
            ref = fam.features(fam.denoiser, x, t, cond)
            got = lrm.tap_features(x, t, cond)
        assert len(got) == len(lrm.taps)
        for i, f in zip(lrm.taps, got):
            assert torch.equal(f, ref[i])  # the same blocks on the same inputs


def test_bad_arguments(families):
    fam = families["sd3"]
    with pytest.raises(FlashDMDError) as e:
        LatentRewardModel(fam, train_backbone="partly")
    _one_line(e)
    with pytest.raises(FlashDMDError) as e:
        LatentRewardModel(fam, taps=[7])
    _one_line(e)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", [False, True, "lora"])
def test_save_load_round_trip(families, folders, tmp_path, name, mode):
    fam = families[name]
    torch.manual_seed(1)
    lrm = LatentRewardModel(fam, proj_dim=16, hidden_dim=32, train_backbone=mode, time_embed_dim=8,
                            teacher=str(folders[name]))
    with torch.no_grad():  # move every trainable weight away from its initialisation
        for p in lrm.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t, cond = _batch(fam, n=3)
    with torch.no_grad():
        want = lrm.score(x, t, cond)
    lrm.save(tmp_path / "lrm")
    cfg = json.loads((tmp_path / "lrm" / "lrm.json").read_text())
    assert cfg["train_backbone"] == mode and cfg["family"] == name
    loaded = LatentRewardModel.load(tmp_path / "lrm", fam)
    with torch.no_grad():
        assert torch.equal(loaded.score(x, t, cond), want)
    if mode is False:  # heads only: the file is tiny and the teacher pointer alone rebuilds it
        from safetensors.torch import load_file
        assert not any(k.startswith("backbone.") for k in load_file(str(tmp_path / "lrm" / "lrm.safetensors")))
        again = LatentRewardModel.load(tmp_path / "lrm")
        with torch.no_grad():  # the same weights from the teacher's folder, the same prompts: bitwise
            assert torch.equal(again.score(x, t, again.family.encode_prompts(
                [PROMPTS[i % len(PROMPTS)] for i in range(3)])), want)


def test_load_errors(families, tmp_path):
    fam = families["sdxl"]
    with pytest.raises(FlashDMDError) as e:
        LatentRewardModel.load(tmp_path / "nowhere", fam)
    _one_line(e)
    lrm = LatentRewardModel(fam, proj_dim=8, hidden_dim=8)
    lrm.save(tmp_path / "a")
    with pytest.raises(FlashDMDError) as e:  # wrong family
        LatentRewardModel.load(tmp_path / "a", families["sd3"])
    _one_line(e)
    cfg = json.loads((tmp_path / "a" / "lrm.json").read_text())
    assert cfg["teacher_fingerprint"] == LatentRewardModel(fam, proj_dim=8, hidden_dim=8).teacher_fingerprint()
    cfg["teacher_fingerprint"] = "0" * 16  # heads trained on other teacher weights
    (tmp_path / "a" / "lrm.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashDMDError) as e:
        LatentRewardModel.load(tmp_path / "a", fam)
    _one_line(e)
    assert "retrain" in str(e.value)
    (tmp_path / "a" / "lrm.json").write_text("{not json")
    with pytest.raises(FlashDMDError) as e:
        LatentRewardModel.load(tmp_path / "a", fam)
    _one_line(e)


# ---------------------------------------------------------------------------------------------------
# the loss


def test_bradley_terry_closed_form():
    s_w = torch.tensor([2.0, -1.0, 0.0, 30.0, -30.0], requires_grad=True)
    s_l = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    loss = bradley_terry_loss(s_w, s_l)
    d = (s_w - s_l).detach().double()
    want = -torch.log(1 / (1 + torch.exp(-d)))
    assert loss.shape == (5,)
    # float32 against float64: d rounds once (relative to |d|; -log sigmoid has slope < 1), the function once or
    # twice (relative to the loss)
    assert_close(loss.double(), want, factor=3, mag=magnitude(d) + magnitude(want))
    assert within(abs(loss[2].item() - math.log(2)), fp32_bound(math.log(2), 2))  # log 2 in float32: two roundings
    loss.sum().backward()  # d/ds_w [-log sigmoid(d)] = -sigmoid(-d)
    # the gradient: sigmoid (slope <= 1/4 of d's rounding) and its own roundings, of values <= 1
    assert_close(s_w.grad.double(), -torch.sigmoid(-d), factor=3, mag=1 + magnitude(d) / 4)


def test_pair_is_noised_with_shared_noise(families):
    for fam in families.values():
        x_w, x_l = torch.randn(2, 3, 4, 8, 8).unbind(0)
        t = fam.schedule.sample_timesteps(3, 0.1, 0.9).float()
        noise = torch.randn_like(x_w)
        xw_t, xl_t = noised_pair(fam.schedule, x_w, x_l, t, noise)
        alpha, sigma = fam.schedule.alpha_sigma(t)
        a, s = alpha[:, None, None, None], sigma[:, None, None, None]
        # float32: each noised latent a x + s n rounds 3 times on values up to |a x| + |s n|, the difference once
        # more, a (x_w - x_l) twice: the shared noise cancels up to that
        mag = float((a * torch.maximum(x_w.abs(), x_l.abs())).max()) + float((s * noise.abs()).max())
        assert_close(xw_t - xl_t, a * (x_w - x_l), factor=9, mag=mag)
        assert_close(xw_t, a * x_w + s * noise, factor=3, mag=mag)


def test_split_is_disjoint_and_seeded():
    tr, va = split_indices(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(va, split_indices(50, 0.2, seed=3)[1])
    with pytest.raises(FlashDMDError):
        split_indices(10, 1.5)


# ---------------------------------------------------------------------------------------------------
# learning a known preference


def synthetic_pairs(fam, n: int, seed: int = 0, side: int = 8, larger: bool = True) -> PairSet:
    """Pairs whose preferred member has the larger (``larger=False``: smaller) latent mean:
    x = m + 0.5 * noise, m ~ U(-1, 1); ``side`` x ``side`` latents (smaller than the models' 16 x 16
    default: 4x cheaper, same code path)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, fam.latent_channels, side, side)
    m = torch.rand(n, 2, generator=g) * 2 - 1
    a = m[:, 0, None, None, None] + 0.5 * torch.randn(shape, generator=g)
    b = m[:, 1, None, None, None] + 0.5 * torch.randn(shape, generator=g)
    a_wins = ((a.mean(dim=(1, 2, 3)) > b.mean(dim=(1, 2, 3))) == larger)[:, None, None, None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return PairSet(prompts, torch.where(a_wins, a, b), torch.where(a_wins, b, a), [None] * n)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("larger", [True, False])
def test_learns_a_known_preference(families, name, larger):
    """Both directions of the preference are learnt from the same initialisation, so a lucky random
    initial ranking cannot pass the test: > 0.7 held-out accuracy at low noise in both."""
    fam = families[name]
    pairs = synthetic_pairs(fam, 160, larger=larger)
    torch.manual_seed(0)
    lrm = LatentRewardModel(fam, proj_dim=16, hidden_dim=64)
    metrics = train_lrm(lrm, pairs, steps=30, batch_size=16, lr=3e-3, val_frac=0.25, t_range=(0.02, 0.5),
                        eval_draws=1, log_every=30, report_before=False, report_train=False,
                        print_fn=lambda *_: None)
    acc = metrics["heldout_accuracy"]
    assert set(acc) == set(NOISE_BANDS) and metrics["num_heldout"] == 40
    assert acc["low"] > 0.7, metrics
    assert metrics["loss_curve"][-1]["loss"] < math.log(2)


def test_accuracy_is_deterministic_and_counts_ties(families):
    fam = families["sd3"]
    pairs = synthetic_pairs(fam, 6)
    lrm = LatentRewardModel(fam, proj_dim=8, hidden_dim=8)
    bank = PromptBank(fam, pairs.prompts)
    idx = torch.arange(6)
    a1 = pairwise_accuracy(lrm, pairs, bank, idx, NOISE_BANDS["mid"], draws=1, seed=5)
    assert a1 == pairwise_accuracy(lrm, pairs, bank, idx, NOISE_BANDS["mid"], draws=1, seed=5)
    same = PairSet(pairs.prompts, pairs.winners, pairs.winners.clone(), pairs.labels)
    assert pairwise_accuracy(lrm, same, bank, idx, NOISE_BANDS["mid"], draws=1) == 0.5


# ---------------------------------------------------------------------------------------------------
# pairs files


def test_pairs_file_orientation_and_pngs(families, tmp_path):
    import numpy as np
    from PIL import Image
    fam = families["sdxl"]
    lat = torch.randn(4, 4, 16, 16)
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black_small.png")  # grey, resized on load
    records = [{"prompt": "p0", "a": 0, "b": 1, "preferred": "a", "label": 7},
               {"prompt": "p1", "a": 2, "b": 3, "preferred": "b"},
               {"prompt": "p2", "a": "white.png", "b": "black_small.png", "preferred": "a", "meta": {"x": 1}}]
    path = write_pairs(tmp_path / "pairs.jsonl", records, lat)
    assert (tmp_path / "pairs.safetensors").is_file()
    with pytest.raises(FlashDMDError) as e:  # PNGs need the VAE
        load_pairs(path)
    _one_line(e)
    ps = load_pairs(path, fam)
    assert len(ps) == 3 and ps.prompts == ["p0", "p1", "p2"] and ps.labels == [7, None, None]
    assert torch.equal(ps.winners[0], lat[0]) and torch.equal(ps.losers[0], lat[1])
    assert torch.equal(ps.winners[1], lat[3]) and torch.equal(ps.losers[1], lat[2])
    white = fam.encode_images(torch.ones(1, 3, 32, 32))[0]
    # 255 decodes to exactly 1.0; the VAE encoder may run on another batch (float32 round-off of the encoder)
    assert_close(ps.winners[2], white, factor=network_factor(fam.vae.encoder) + 4)


@pytest.mark.parametrize("content, fragment", [
    ("", "holds no pairs"),
    ("\n  \n", "holds no pairs"),
    ('{"prompt": "p", "a": 0, "b": 1, "preferred": "a"}\n{"prompt": "p", "a": 0,\n', ":2: malformed JSON"),
    ('[1, 2]\n', "JSON object"),
    ('{"prompt": "p", "a": 0, "preferred": "a"}\n', "lacks b"),
    ('{"prompt": "p", "a": 0, "b": 1, "preferred": "c"}\n', "preferred must be"),
    ('{"prompt": "p", "a": -1, "b": 1, "preferred": "a"}\n', "latent row"),
    ('{"prompt": "p", "a": 0, "b": 1, "preferred": "a"}\n', "companion"),
])
def test_bad_pairs_files(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FlashDMDError) as e:
        load_pairs(path)
    _one_line(e)
    assert fragment in str(e.value)


def test_missing_pairs_file_and_out_of_range_rows(tmp_path):
    with pytest.raises(FlashDMDError) as e:
        read_records(tmp_path / "absent.jsonl")
    _one_line(e)
    path = write_pairs(tmp_path / "p.jsonl", [{"prompt": "p", "a": 0, "b": 5, "preferred": "a"}],
                       torch.zeros(2, 4, 8, 8))
    with pytest.raises(FlashDMDError) as e:
        load_pairs(path)
    _one_line(e)
    assert "row 5" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_reward_train_end_to_end(families, folders, tmp_path, capsys):
    fam = families["sd3"]
    ps = synthetic_pairs(fam, 12)
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(ps.prompts)]
    ps = synthetic_pairs(fam, 12, side=16)  # the CLI checks the teacher's latent shape
    pairs = write_pairs(tmp_path / "pairs.jsonl", records, torch.stack([ps.winners, ps.losers], 1).flatten(0, 1))
    out = tmp_path / "lrm"
    rc = main(["reward", "train", "--pairs", str(pairs), "--family-model", str(folders["sd3"]), "--out", str(out),
               "--steps", "3", "--batch", "4", "--proj-dim", "8", "--hidden-dim", "16", "--val-frac", "0.25",
               "--eval-draws", "1", "--log-every", "1"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heldout_accuracy"]) == {"low", "mid", "high"} and metrics["num_heldout"] == 3
    assert (out / "lrm.safetensors").is_file()
    lrm = LatentRewardModel.load(out, fam)
    assert lrm.proj_dim == 8
    err = capsys.readouterr().err
    assert "reward train: 100%" in err and "3/3 [" in err and "<" in err   # a bar over the updates, with the time left
    # continue from the saved LRM, on two pairs files concatenated
    rc = main(["reward", "train", "--pairs", str(pairs), str(pairs), "--family-model", str(folders["sd3"]), "--out",
               str(tmp_path / "lrm2"), "--init", str(out), "--steps", "1", "--batch", "2", "--eval-draws", "1",
               "--threads", "1", "--no-progress"])
    assert rc == 0 and "reward train:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "lrm2" / "metrics.json").read_text())["num_pairs"] == 24


@pytest.mark.parametrize("content", [None, "", "{oops\n"])
def test_cli_bad_pairs_is_one_line(folders, tmp_path, capsys, content):
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content)
    rc = main(["reward", "train", "--pairs", str(path), "--family-model", str(folders["sd3"]),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err


def test_cli_make_pairs_needs_a_judge_for_a_model_of_no_plugin(folders, tmp_path, capsys):
    # before judges, the world's oracle silently judged any model; now a model of no plug-in needs --judge
    # (make-pairs with local judges and with the world's plug-in: tests/test_pairs_real.py)
    out = tmp_path / "pairs.jsonl"
    rc = main(["reward", "make-pairs", "--model", str(folders["sdxl"]), "--num", "3", "--out", str(out),
               "--steps-a", "3", "--steps-b", "1", "--cfg-b", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: make-pairs needs a judge for ") and "\n" not in err, err
    assert not out.exists()
