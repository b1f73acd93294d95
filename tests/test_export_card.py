"""Every export writes a model card (huggingface_hub's ModelCard: base model, licence of the base, library, tags,
method and settings, steps and scheduler, the run's last held-out metrics, its last sample grid, how to load the
LoRA elsewhere), and `--push-to-hub REPO` uploads the finished folder through huggingface_hub's HfApi (checked at
that boundary, offline), or says in one line why it cannot.
"""
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from export_runs import lora_run  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.export import card  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402

REPO = "someone/tiny-sdxl-4step"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA run on a teacher that sits in a hub-cache snapshot folder with a licence in its README, with the
    run's config.yaml (the config's own writer), two evaluations in metrics.json and two sample grids."""
    tmp = tmp_path_factory.mktemp("card")
    snap = tmp / "hub" / "models--acme--tiny-sdxl" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    run = lora_run(tmp, "sdxl")
    teacher = tmp / "teacher_sdxl"
    for p in teacher.iterdir():
        p.rename(snap / p.name)
    (snap / "README.md").write_text("---\nlicense: openrail++\ntags:\n- text-to-image\n---\n# a tiny teacher\n")
    info = json.loads((run / "run.json").read_text())
    info.update(teacher=str(snap), teacher_path=str(snap))
    (run / "run.json").write_text(json.dumps(info))
    cfg = DistillConfig(model_teacher=str(snap), model_lora_rank=2, model_lora_alpha=4.0, run_max_steps=10,
                        disc_kind="none")
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.json").write_text(json.dumps({
        "evals": [{"step": 5, "clip_score": 0.11, "fid": 40.0}, {"step": 10, "clip_score": 0.25, "fid": 31.5}],
        "higher_is_better": {"clip_score": True, "fid": False}}))
    (run / "samples").mkdir()
    for step, colour in ((5, "red"), (10, "blue")):
        Image.new("RGB", (8, 4), colour).save(run / "samples" / f"step_{step:06d}.png")
    return run


def test_every_export_has_a_model_card(run, tmp_path):
    out = tmp_path / "lora"
    assert main(["export", "--run", str(run), "--out", str(out), "--lora-format", "kohya"]) == 0
    mc = ModelCard.load(out / "README.md")
    data = mc.data.to_dict()
    assert data["base_model"] == "acme/tiny-sdxl" and data["license"] == "openrail++"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"lora", "stable-diffusion-xl", "flashdmd"} <= set(data["tags"])
    text = mc.text
    # the run's last evaluation (not the first), with directions; its settings; steps and scheduler
    assert "step 10" in text and "| clip_score | 0.25 | higher is better |" in text and "| fid | 31.5 | lower" in text
    assert "0.11" not in text
    assert "| `model_lora_rank` | `2` |" in text and "| `run_max_steps` | `10` |" in text
    assert "4-step student run by `LCMScheduler`" in text
    # the last grid, copied byte for byte, and shown
    assert (out / card.GRID).read_bytes() == (run / "samples" / "step_000010.png").read_bytes()
    assert f"![samples]({card.GRID})" in text
    # how to load this LoRA file in diffusers and in A1111 / ComfyUI
    assert 'weight_name="lora_kohya.safetensors"' in text and "A1111" in text and "ComfyUI" in text


def test_a_bare_run_gets_a_card_without_metrics_or_grid(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("run.json", "student"):
        (bare / name).symlink_to(run / name)
    out = tmp_path / "out"
    assert main(["export", "--run", str(bare), "--out", str(out)]) == 0
    mc = ModelCard.load(out / "README.md")
    assert "recorded no held-out evaluation" in mc.text and not (out / card.GRID).exists()
    assert "lora" not in mc.data.to_dict()["tags"]  # the LoRA is fused: a full denoiser


@pytest.fixture
def online(monkeypatch):
    """The hub switched on (the suite runs with HF_HUB_OFFLINE=1) and a token; HfApi's two calls recorded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(card, "get_token", lambda: "hf_test")
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "files": files, **kw}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_finished_folder(run, tmp_path, online, capsys):
    out = tmp_path / "pushed"
    assert main(["export", "--run", str(run), "--out", str(out), "--lora", "--push-to-hub", REPO]) == 0
    (c1, repo1, kw1), (c2, repo2, kw2) = online
    assert (c1, repo1, c2, repo2) == ("create_repo", REPO, "upload_folder", REPO)
    assert kw1["exist_ok"] is True and kw1.get("repo_type", "model") == "model"
    assert Path(kw2["folder_path"]) == out and kw2.get("repo_type", "model") == "model"
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert kw2["files"] == on_disk  # the whole folder, finished (no .tmp)
    assert {"README.md", "model_index.json", "pytorch_lora_weights.safetensors", card.GRID} <= set(kw2["files"])
    assert f"https://huggingface.co/{REPO}/commit/abc" in capsys.readouterr().out


@pytest.mark.parametrize("why", ["offline", "no-token", "bad-repo"])
def test_push_to_hub_refusals_are_one_line_errors(run, tmp_path, online, monkeypatch, capsys, why):
    repo = REPO
    if why == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif why == "no-token":
        monkeypatch.setattr(card, "get_token", lambda: None)
    else:
        repo = "not a repo"
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(out), "--push-to-hub", repo]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--push-to-hub" in err
    assert {"offline": "HF_HUB_OFFLINE", "no-token": "token", "bad-repo": "repo id"}[why] in err
    assert not online and not out.exists()  # refused before anything was written or sent
