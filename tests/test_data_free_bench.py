"""benchmarks/data_free.py --smoke: the data-free comparison runs through its own code at tiny sizes -- make-reals
from the world teacher with the world's class prompts, then the world-sdxl preset with data_real = that folder and
with the Fashion-MNIST reals -- and writes the FD curves it would write at full size."""
import json
import math
import runpy
import sys
from pathlib import Path

import torch

from flashdmd.data import open_image_source
from flashdmd.world.prompts import class_of_prompt

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_runs_both_sources_and_writes_the_curves(tmp_path, monkeypatch):
    out, work = tmp_path / "data_free.json", tmp_path / "work"
    monkeypatch.setattr(sys, "argv", ["data_free.py", "--smoke", "--work", str(work), "--out", str(out),
                                      "--no-progress"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "data_free.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    finally:
        torch.set_num_threads(threads)   # the script pins its own
    d = json.loads(out.read_text())
    assert d["smoke"] and d["teacher"] == "world-sdxl" and d["make_reals"]["num"] == 8
    assert d["make_reals"]["guidance_scale"] == 2.0   # the world teacher's own guidance (its flashdmd.json)
    # the teacher's images: a captioned folder, one class prompt per image, every class in turn
    reals = open_image_source(work / "reals")
    assert len(reals) == 8 and [class_of_prompt(reals.caption(i)) for i in range(8)] == list(range(8))
    assert set(d["rows"]) == {"teacher_reals_seed0", "fashion_mnist_seed0"}
    for name, row in d["rows"].items():
        config = (work / name / "config.yaml").read_text()
        assert f"data_real: {row['data_real']}\n" in config
        assert [e["generator_steps"] for e in row["curve"]] == [0, 1]
        assert all(math.isfinite(e["fd"]) for e in row["curve"]) and row["final_fd"] == row["curve"][-1]["fd"]
    assert d["rows"]["teacher_reals_seed0"]["data_real"] == str(work / "reals")
    assert d["rows"]["fashion_mnist_seed0"]["data_real"] == "world"
    ratio = d["sources"]["teacher_reals"]["final_fd_mean"] / d["sources"]["fashion_mnist"]["final_fd_mean"]
    assert d["teacher_reals_over_fashion_mnist_final_fd"] == ratio
