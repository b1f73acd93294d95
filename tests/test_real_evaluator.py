"""RealEvaluator: the Evaluator of real models (FID, CLIP score, ... from local weights on a prompt file), on a
tiny SDXL pipeline, a tiny random CLIPModel and a random FID Inception."""
import math

import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.evaluation import Evaluator, worsened
from flashdmd.evaluation import real
from flashdmd.evaluation.backends.fid import save_stats
from flashdmd.evaluation.real import RealEvaluator
from flashdmd.inference import load_model
from tests.tiny_models import save_pipeline, sdxl_pipeline

pytestmark = pytest.mark.usefixtures("small_fid_input")  # conftest.py: FID network on 75x75 inputs
PROMPTS = ["a photo of a cat", "the drawing of a dog", "a red car in the rain"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    return load_model(str(save_pipeline(sdxl_pipeline(tmp / "tok"), tmp / "pipe")))


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_clip_score_evaluator(sdxl, clip_dir, prompts_file):
    ev = RealEvaluator.from_paths(prompts_file, 4, clip=clip_dir)
    assert isinstance(ev, Evaluator)
    assert ev.higher_is_better == {"clip_score": True}
    m = ev.evaluate(sdxl, steps=2)
    assert set(m) == {"clip_score", "clip_score_std", "seconds_per_image", "nfe", "num_images"}
    assert 0 <= m["clip_score"] <= 100 and m["num_images"] == 4 and m["nfe"] == 2 * 2
    # the same held-out prompts and noise every time: evaluations over training compare like with like -- the same
    # computation, so bitwise the same score; another seed draws other noise, so another score
    assert ev.evaluate(sdxl, steps=2)["clip_score"] == m["clip_score"]
    assert ev.evaluate(sdxl, seed=1, steps=2)["clip_score"] != m["clip_score"]
    # the protocol's guard reads the direction from the evaluator
    assert worsened(m, {**m, "clip_score": m["clip_score"] - 50}, ev.higher_is_better, 0.1)


def test_fid_evaluator(sdxl, clip_dir, inception_file, prompts_file, tmp_path):
    stats = tmp_path / "ref.safetensors"
    save_stats(stats, torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64), 10)
    ev = RealEvaluator.from_paths(prompts_file, 4, fid_inception=inception_file, fid_ref=stats)
    assert ev.higher_is_better == {"fid": False}
    m = ev.evaluate(sdxl, steps=2)
    assert "fid" in m and math.isfinite(m["fid"]) and m["fid"] > 0 and "fid_std" not in m
    both = RealEvaluator.from_paths(prompts_file, 4, fid_inception=inception_file, fid_ref=stats, clip=clip_dir)
    assert both.higher_is_better == {"fid": False, "clip_score": True}
    assert both.evaluate(sdxl, steps=2)["fid"] == m["fid"]  # the same images and features: the same FID


def test_wrong_paths_fail_at_construction_before_loading(clip_dir, inception_file, prompts_file, tmp_path,
                                                         monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a backend was loaded before every path was checked")

    monkeypatch.setattr(real, "load_scorer", no_loading)
    monkeypatch.setattr(real.FIDInception, "from_file", no_loading)
    for kwargs, want in (
            (dict(clip=clip_dir, pickscore=tmp_path / "nope"), "nope not found"),
            (dict(hpsv2=tmp_path), "has no config.json"),
            (dict(fid_inception=tmp_path / "gone.pth", fid_ref=tmp_path), "gone.pth not found"),
            (dict(fid_inception=inception_file, fid_ref=tmp_path / "ref.npz"), "ref.npz not found"),
            (dict(fid_inception=inception_file), "FID needs both"),
            (dict(fid_ref=tmp_path), "FID needs both")):
        for make in (RealEvaluator.from_paths, RealEvaluator.check_paths):
            with pytest.raises(FlashDMDError) as e:
                make(prompts_file, 4, **kwargs)
            assert want in _one_line(e), (kwargs, str(e.value))
    with pytest.raises(FlashDMDError) as e:
        RealEvaluator.from_paths(tmp_path / "missing.txt", 4, clip=clip_dir)
    assert "missing.txt not found" in _one_line(e)
    with pytest.raises(FlashDMDError) as e:
        RealEvaluator.from_paths(prompts_file, 0, clip=clip_dir)
    assert ">= 1" in _one_line(e)
    with pytest.raises(FlashDMDError) as e:
        RealEvaluator.from_paths(prompts_file, 1, fid_inception=inception_file, fid_ref=tmp_path)
    assert "at least 2" in _one_line(e)
    # the cheap check reads the prompts and no weights
    assert RealEvaluator.check_paths(prompts_file, 4, clip=clip_dir) == PROMPTS
