"""Metric backends for real models (FID Inception, CLIP score, PickScore, HPSv2, ImageReward) on tiny random
models of their real architectures, and `flashdmd eval` / `flashdmd eval-stats` end to end on a tiny SDXL pipeline."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.cli import main
from flashdmd.evaluation.backends import ImagePreprocess, load_scorer, score_batched
from flashdmd.evaluation.backends.fid import (FIDInception, FIDInceptionV3, load_stats,
                                              reference_stats, save_stats)
from flashdmd.evaluation.backends.hpsv2 import HPSv2, convert_open_clip_state_dict
from flashdmd.evaluation.backends.imagereward import HEAD_FILE, ImageReward, RewardMLP
from flashdmd.evaluation.metrics import feature_stats, frechet_distance
from tests.tiny_models import save_pipeline, sdxl_pipeline
from tests.tolerances import U32, assert_close, fd_roundoff, network_factor, sampling_factor, within

pytestmark = pytest.mark.usefixtures("small_fid_input")  # conftest.py: FID network on 75x75 inputs
PROMPTS = ["a photo of a cat", "the drawing of a dog", "a red car in the rain"]


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Random images on the 8-bit grid, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1


class _NotWeights:
    pass


def _one_line(e) -> None:
    assert "\n" not in str(e.value) and str(e.value)


# ---------------------------------------------------------------------------------------------------
# tiny models written in the real on-disk formats


def tiny_imagereward_folder(folder: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "photo", "of", "cat", "the", "drawing", "dog", "red", "car", "in", "rain"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + words
    (folder / "_vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizer(str(folder / "_vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP does
    tok.save_pretrained(str(folder))
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=32, patch_size=8, initializer_range=0.02),  # BLIP's default is 1e-10
        image_text_hidden_size=16)
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(cfg).save_pretrained(str(folder))
    torch.manual_seed(seed + 1)
    save_file(RewardMLP(32).state_dict(), str(folder / HEAD_FILE))
    return folder


@pytest.fixture(scope="module")
def inception(inception_file):
    return FIDInception.from_file(inception_file)


# ---------------------------------------------------------------------------------------------------
# FID


def test_inception_state_dict_names_match_pytorch_fid():
    sd = FIDInceptionV3().state_dict()
    # 94 BasicConv2d (conv + 5 BN entries) + fc, named as torchvision's Inception3 / pytorch-fid
    assert len(sd) == 94 * 6 + 2
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
              "Mixed_6a.branch3x3dbl_3.bn.bias", "Mixed_6e.branch7x7dbl_5.conv.weight",
              "Mixed_7a.branch7x7x3_4.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked"):
        assert k in sd, k
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7b.branch3x3dbl_1.conv.weight"].shape == (448, 1280, 1, 1)
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked"))) \
        == 23_850_960


def test_fid_features_shape_and_self_distance(inception):
    x = _images(3, size=48)
    f = inception.features(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and f.std(0).mean() > 0
    mu, cov = feature_stats(f)
    assert within(frechet_distance(mu, cov, mu, cov), fd_roundoff(cov))  # 0 up to float64 round-off
    g = inception.features(_images(3, size=48, seed=1) * 0.2)   # low-contrast images: other features
    # other by more than the float32 round-off of the network (its fan-in sum, tests/tolerances.py)
    assert (g.mean(0) - f.mean(0)).abs().max() > network_factor(inception.net) * U32 * f.abs().max()


def test_fid_features_at_299(inception, monkeypatch):
    import flashdmd.evaluation.backends.fid as fid
    monkeypatch.setattr(fid, "INPUT_SIZE", 299)
    f = inception.features(_images(1, size=64))
    assert f.shape == (1, 2048) and torch.isfinite(f).all()


def test_fid_reference_folder_and_stats_files(inception, inception_file, tmp_path):
    from PIL import Image
    x = _images(3, size=40, seed=2)
    d = tmp_path / "real"
    d.mkdir()
    for i, im in enumerate(x):
        arr = ((im + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
    # a folder reads the same pixels the tensors hold -> the same statistics
    mu_f, cov_f = reference_stats(d, inception)
    mu_t, cov_t = feature_stats(inception.features(x))
    # the same 8-bit pixels (k / 255 in float32 either way) in one batch of 3: the same computation, bitwise
    assert torch.equal(mu_f, mu_t) and torch.equal(cov_f, cov_t)
    # `flashdmd eval-stats` writes .safetensors and pytorch-fid's .npz; both read back as the same (mu, sigma)
    assert main(["eval-stats", "--images", str(d), "--fid-inception", str(inception_file),
                 "--out", str(tmp_path / "stats.npz"), "--no-progress"]) == 0
    save_stats(tmp_path / "stats.safetensors", mu_f, cov_f, 3)
    for name in ("stats.safetensors", "stats.npz"):
        mu, sigma = load_stats(tmp_path / name)
        assert torch.equal(mu, mu_f) and torch.equal(sigma, cov_f)  # float64 written and read back
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as z:
        assert set(z.files) == {"mu", "sigma"}


def test_fid_errors_are_one_line(tmp_path, inception_file):
    with pytest.raises(FlashDMDError) as e:
        FIDInception.from_file(tmp_path / "nope.pth")
    _one_line(e)
    assert "not found" in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(FlashDMDError) as e:
        FIDInception.from_file(junk)
    _one_line(e)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(FlashDMDError) as e:
        FIDInception.from_file(wrong)
    _one_line(e)
    assert "do not match" in str(e.value)

    evil = tmp_path / "evil.pth"   # a pickle of arbitrary objects is refused (weights_only), never executed
    torch.save({"x": _NotWeights()}, evil)
    with pytest.raises(FlashDMDError) as e:
        FIDInception.from_file(evil)
    _one_line(e)
    stats = tmp_path / "bad.npz"
    np.savez(stats, mean=np.zeros(3))
    with pytest.raises(FlashDMDError) as e:
        load_stats(stats)
    _one_line(e)
    rc = main(["eval-stats", "--images", str(tmp_path / "none"), "--fid-inception", str(inception_file),
               "--out", str(tmp_path / "s.safetensors")])
    assert rc == 2


# ---------------------------------------------------------------------------------------------------
# CLIP-family scores


def test_preprocess_resizes_shortest_side_and_centre_crops():
    pre = ImagePreprocess(size=32, crop=(32, 32))
    x = torch.zeros(2, 3, 48, 64)
    assert pre(x).shape == (2, 3, 32, 32)
    small = ImagePreprocess(size=None, crop=(32, 32))(torch.zeros(1, 3, 16, 16))
    assert small.shape == (1, 3, 32, 32)


def test_clip_score_and_pickscore(clip_dir):
    from transformers import CLIPModel
    x = _images(3, size=48)
    clip = load_scorer("clip", clip_dir)
    s = clip.score(x, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s >= 0).all() and (s <= 100).all()
    cos = clip.cosine(x, PROMPTS)
    assert torch.equal(s, 100 * cos.clamp_min(0))  # the score's own formula on the same cosines
    pick = load_scorer("pickscore", clip_dir)
    p = pick.score(x, PROMPTS)
    # cross-check against transformers' own CLIPModel forward: logits_per_image = logit_scale.exp() * cos
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = pick.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=pick.preprocess(x)).logits_per_image.diagonal()
    # float32: the towers run the same computation (the same batch), the unit embeddings are the same division by
    # the same norm; only the cosine differs (a sum of d = projection_dim products here, a matmul there: d u) and
    # the scale's product (1 u), of scores up to the logit scale
    scale, d = float(model.logit_scale.exp()), model.config.projection_dim
    assert_close(p, ref, factor=d + 1, mag=scale)
    # scores depend on the prompt; batching does not change them: in batches of 2 the towers take other float
    # paths, each embedding within network_factor u of its unit norm, so the cosine within twice that (+ d u)
    k = 2 * network_factor(model.vision_model, model.visual_projection, model.text_model, model.text_projection) + d
    assert (pick.score(x, PROMPTS[::-1]) - p).abs().max() > k * U32 * scale
    assert_close(score_batched(pick, x, PROMPTS, batch_size=2), p, factor=k, mag=scale)


def test_hpsv2_conversion_round_trip(clip_dir, tmp_path):
    from safetensors.torch import load_file
    hps = load_scorer("hpsv2", clip_dir)
    assert isinstance(hps, HPSv2)
    x = _images(2, size=32)
    assert torch.equal(hps.score(x, PROMPTS[:2]), 100 * hps.cosine(x, PROMPTS[:2]))  # the score's formula
    # open_clip's names -> transformers' names: write the tiny model in open_clip's layout and convert back
    hf = load_file(str(clip_dir / "model.safetensors"))
    oc = {}
    for k, v in hf.items():
        k2 = (k.replace("vision_model.encoder.layers.", "visual.transformer.resblocks.")
               .replace("text_model.encoder.layers.", "transformer.resblocks.")
               .replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
               .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
        inv = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
               "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
               "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
               "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
               "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
               "vision_model.post_layernorm.weight": "visual.ln_post.weight",
               "vision_model.post_layernorm.bias": "visual.ln_post.bias",
               "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm.weight": "ln_final.weight",
               "text_model.final_layer_norm.bias": "ln_final.bias", "logit_scale": "logit_scale"}
        if k in inv:
            oc[inv[k]] = v
        elif k == "visual_projection.weight":
            oc["visual.proj"] = v.t()
        elif k == "text_projection.weight":
            oc["text_projection"] = v.t()
        elif "position_ids" in k:
            continue
        elif ".self_attn.q_proj." in k2:
            kind = k2.rsplit(".", 1)[1]
            parts = [hf[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            oc[k2.split("self_attn.")[0] + f"attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".self_attn.k_proj." in k2 or ".self_attn.v_proj." in k2:
            continue
        else:
            oc[k2] = v
    back = convert_open_clip_state_dict({"module." + k: v for k, v in oc.items()})
    want = {k: v for k, v in hf.items() if "position_ids" not in k}
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_imagereward(tmp_path):
    d = tiny_imagereward_folder(tmp_path / "ir")
    ir = load_scorer("imagereward", d)
    assert isinstance(ir, ImageReward)
    x = _images(3, size=48)
    s = ir.score(x, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    # other prompts or images move the scores by more than the network's float32 round-off: relative to the raw
    # reward |s| std + |mean|, then divided by std
    tol = network_factor(ir.blip.vision_model, ir.blip.text_encoder, ir.head) * U32 * (
        float(s.abs().max()) + abs(ir.mean) / ir.std)
    assert (ir.score(x, PROMPTS[::-1]) - s).abs().max() > tol      # the text cross-attends to the image
    assert (ir.score(_images(3, size=48, seed=5), PROMPTS) - s).abs().max() > tol
    assert ir.tokenizer(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")["input_ids"].shape == (3, 35)


def test_backend_folder_errors_are_one_line(tmp_path, clip_dir):
    for name in ("clip", "pickscore", "hpsv2", "imagereward"):
        with pytest.raises(FlashDMDError) as e:
            load_scorer(name, tmp_path / "missing")
        _one_line(e)
        assert "not found" in str(e.value)
    with pytest.raises(FlashDMDError) as e:         # a CLIP folder is not an ImageReward folder
        load_scorer("imagereward", clip_dir)
    _one_line(e)
    bad = tmp_path / "ir_as_clip"
    tiny_imagereward_folder(bad)
    with pytest.raises(FlashDMDError) as e:         # a BLIP folder is not a CLIP folder
        load_scorer("clip", bad)
    _one_line(e)
    assert "expected" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# `flashdmd eval` on a real (non-world) pipeline folder


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    return save_pipeline(sdxl_pipeline(tmp / "tok"), tmp / "pipe")


class _Recorder:
    """A scoring backend that keeps what it was given."""

    def __init__(self):
        self.images, self.prompts = [], []

    def score(self, images, prompts):
        self.images.append(images.clone())
        self.prompts += list(prompts)
        return torch.zeros(images.shape[0])


def test_evaluate_real_streams_chunks_with_distinct_noise(sdxl_dir, monkeypatch):
    from flashdmd.evaluation import real
    from flashdmd.inference import load_model, sample_images
    monkeypatch.setattr(real, "CHUNK", 4)
    model = load_model(str(sdxl_dir))
    rec = _Recorder()
    m = real.evaluate_real(model, PROMPTS, 6, {"fid": None, "scorers": {"clip": rec}}, seed=7, steps=2,
                           batch_size=3, metric_batch_size=2)
    assert m["clip_score"] == 0.0 and m["num_images"] == 6
    assert rec.prompts == PROMPTS * 2                               # prompts cycle
    imgs = torch.cat(rec.images)
    one_call = sample_images(model, (PROMPTS * 2)[:4], seed=7, steps=2)    # chunk 0 = one call (other batching)
    # float32 images in [-1, 1] along another batching (4 at once, not 3 + 1): within the pipeline's round-off
    k = sampling_factor(model.family, 2, model.guidance_scale)
    assert_close(imgs[:4], one_call, factor=k, mag=1.0)
    assert torch.equal(imgs[:4], sample_images(model, (PROMPTS * 2)[:4], seed=7, steps=2, batch_size=3))  # 3 + 1
    # chunk 1 repeats chunk 0's prompts (4, 5 = prompts 1, 2) but not its noise
    assert (imgs[4] - imgs[1]).abs().max() > k * U32 and (imgs[5] - imgs[2]).abs().max() > k * U32


def test_cli_eval_real_model_end_to_end(tmp_path, sdxl_dir, clip_dir, inception_file, capsys):
    model = sdxl_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    stats = tmp_path / "ref.safetensors"
    save_stats(stats, torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64), 10)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model), "--prompts", str(prompts), "--num-images", "6", "--seed", "3",
            "--steps", "2", "--batch-size", "4", "--clip", str(clip_dir), "--fid-inception", str(inception_file),
            "--fid-ref", str(stats), "--json", str(out)]
    assert main(argv) == 0
    m = json.loads(out.read_text())
    for k in ("fid", "clip_score", "clip_score_std", "seconds_per_image", "nfe", "num_images"):
        assert k in m, k
    assert m["num_images"] == 6 and m["nfe"] == 2 * 2 and m["kind"] == "teacher"
    assert m["fid"] > 0 and 0 <= m["clip_score"] <= 100 and m["seconds_per_image"] > 0
    assert "eval: 100%" in capsys.readouterr().err   # the progress bar over the sampled images
    # a wrong backend path fails before any sampling, as one line, exit 2
    assert main(argv[:-2] + ["--pickscore", str(tmp_path / "nope"), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "nope not found" in err   # checked before loading
    # FID needs both halves
    assert main(["eval", "--model", str(model), "--prompts", str(prompts), "--fid-ref", str(stats),
                 "--json", str(out)]) == 2
