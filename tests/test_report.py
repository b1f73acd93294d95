"""The run report (flashdmd.evaluation.report.write_report) on fake run folders: a real-model run (FID / CLIP
score, sample grids with their prompts) and a world run (FD / alignment / diversity / oracle, Stage 2, the demo's
comparison rows and grids)."""
import json
import re

import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.cli import main
from flashdmd.evaluation.report import direction, metric_keys, save_grid, stage2_start, write_report

CONFIG = "method: flashdmd\nmodel_teacher: /models/sdxl\ndata_prompts: prompts.txt\n"


def _history(steps, stage_of=lambda s: 1):
    return [{"step": s, "stage": stage_of(s), "generator_steps": s, "rl_steps": 0, "loss/generator": 1.0 / s,
             "loss/fake_score": 0.5, "dm_loss/step0": 0.2, "disc/real": 0.3, "disc/fake": -0.3} for s in steps]


def _grids(run_dir, steps, prompts, nrow):
    for s in steps:
        save_grid(torch.rand(len(prompts), 3, 8, 8) * 2 - 1, run_dir / "samples" / f"step_{s:06d}.png", nrow=nrow)
    (run_dir / "samples" / "prompts.json").write_text(json.dumps({"prompts": prompts, "nrow": nrow}))


def _imgs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_of_a_real_model_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    evals = [{"step": s, "stage": 1, "generator_steps": s, "images_seen": 16 * s, "fid": 90.0 - s / 10,
              "clip_score": 20.0 + s / 100, "clip_score_std": 3.0, "seconds_per_image": 0.5, "nfe": 4,
              "num_images": 100} for s in (100, 200, 300)]
    (run / "metrics.json").write_text(json.dumps({"generator_steps": 300, "rl_steps": 0, "wall_seconds": 600,
                                                  "history": _history((50, 100, 150, 200, 250, 300)),
                                                  "evals": evals, "warnings": []}))
    (run / "config.yaml").write_text(CONFIG)
    prompts = ["a red fox in the snow", "a <b>bold</b> teapot", "a red fox in the snow", "a lighthouse at dusk"]
    _grids(run, (100, 300), prompts, nrow=2)

    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    page = out.read_text()
    for needle in ("FID", "CLIP score", "lower", "higher", "± 3.000", "step 300", "4,800 images",
                   "Resolved config", "model_teacher: /models/sdxl", "a lighthouse at dusk",
                   "a &lt;b&gt;bold&lt;/b&gt; teapot"):      # prompts are escaped, not markup
        assert needle in page, needle
    imgs = _imgs(page)
    assert "samples/step_000100.png" in imgs and "samples/step_000300.png" in imgs
    for name in ("curve_eval_fid.png", "curve_eval_clip_score.png", "curve_losses.png"):
        assert name in imgs and (run / name).is_file(), name
    assert all((run / i).is_file() for i in imgs)
    # one prompt line per grid row, in grid order
    rows = re.findall(r"<li>(.*?)</li>", page)
    assert len(rows) == 2 and "fox" in rows[0] and "teapot" in rows[0] and "lighthouse" in rows[1]
    # no world metrics invented, no stage 2 on a Stage-1 run
    assert "alignment" not in page and "oracle" not in page and stage2_start(json.loads(
        (run / "metrics.json").read_text())) is None
    # `flashdmd report DIR` rewrites it
    out.unlink()
    assert main(["report", str(run)]) == 0 and out.is_file()


def test_report_reads_the_runs_own_directions_and_unknown_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    evals = [{"step": 10, "my_score": 1.0, "fid": 5.0}, {"step": 20, "my_score": 2.0, "fid": 4.0}]
    (run / "metrics.json").write_text(json.dumps({"evals": evals, "higher_is_better": {"my_score": False}}))
    page = write_report(run).read_text()
    assert "my_score" in page and "curve_eval_my_score.png" in _imgs(page)
    assert metric_keys(evals, {"my_score": False}) == ["my_score", "fid"]
    assert direction("my_score", {"my_score": False}) is False and direction("clip_score") is True
    assert direction("fd") is False and direction("nothing") is None
    assert "samples/" not in page          # a run without sample grids still renders


def test_report_of_a_world_run_with_stage2_and_demo_rows(tmp_path):
    run = tmp_path / "demo"
    run.mkdir()
    stage = lambda s: 2 if s > 200 else 1                                   # noqa: E731
    evals = [{"step": s, "stage": stage(s), "generator_steps": min(s, 200), "rl_steps": max(s - 200, 0),
              "images_seen": 32 * min(s, 200), "fd": 30.0 - s / 20, "alignment": 0.8, "diversity": 0.9,
              "oracle": 0.1 * s, "seconds_per_image": 0.01, "nfe": 4, "num_images": 500, "hacking_warning": 0.0}
             for s in (100, 200, 300)]
    rows = [{"model": "teacher, CFG 5", "steps": 50, "nfe": 100, "fd": 8.0, "alignment": 0.9, "diversity": 0.95,
             "oracle": 0.5, "seconds_per_image": 0.2},
            {"model": "student (Flash-DMD)", "steps": 4, "nfe": 4, "fd": 15.0, "alignment": 0.85, "diversity": 0.9,
             "oracle": 0.4, "seconds_per_image": 0.01}]
    (run / "metrics.json").write_text(json.dumps({
        "generator_steps": 200, "rl_steps": 100, "history": _history((100, 200, 250, 300), stage),
        "evals": evals, "warnings": ["possible reward hacking at step 300"], "comparison": rows}))
    (run / "config.yaml").write_text("model_teacher: world-sdxl\n")
    save_grid(torch.zeros(4, 3, 8, 8), run / "grid_student_4.png", nrow=2)
    _grids(run, (100, 200, 300), ["a photo of a shirt"] * 2 + ["a photo of a boot"] * 2, nrow=4)

    page = write_report(run, grids=[("grid_student_4.png", "Flash-DMD student, 4 steps")],
                        title="flashdmd demo", summary="A 4-step student.").read_text()
    for needle in ("flashdmd demo", "A 4-step student.", "FD ↓", "alignment ↑", "oracle ↑", "teacher, CFG 5",
                   "student (Flash-DMD)", "Flash-DMD student, 4 steps", "possible reward hacking", "Stage 2",
                   "a photo of a shirt <small>×2</small>", "100 RL updates"):
        assert needle in page, needle
    imgs = _imgs(page)
    assert "grid_student_4.png" in imgs and sum(i.startswith("samples/step_") for i in imgs) == 3
    for key in ("fd", "alignment", "diversity", "oracle"):
        assert f"curve_eval_{key}.png" in imgs
    assert "curve_eval_hacking_warning.png" not in imgs      # bookkeeping, not a metric
    assert stage2_start(json.loads((run / "metrics.json").read_text())) == 250


def test_report_shows_at_most_max_grids_and_survives_a_bad_prompts_file(tmp_path, monkeypatch):
    from flashdmd.evaluation import report
    monkeypatch.setattr(report, "MAX_GRIDS", 3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"evals": []}))
    _grids(run, range(10, 80, 10), ["p"], nrow=1)
    (run / "samples" / "prompts.json").write_text("{not json")
    page = write_report(run).read_text()
    shown = [i for i in _imgs(page) if i.startswith("samples/")]
    assert shown == ["samples/step_000010.png", "samples/step_000040.png", "samples/step_000070.png"]
    assert "3 of 7" in page and "unreadable" in page


def test_report_errors_are_one_line(tmp_path):
    (tmp_path / "metrics.json").write_text("[1, 2")
    with pytest.raises(FlashDMDError) as e:
        write_report(tmp_path)
    assert "not readable JSON" in str(e.value) and "\n" not in str(e.value)
