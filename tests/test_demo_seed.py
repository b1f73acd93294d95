"""`flashdmd demo --seed N` (issue 16, item 4): the training seed reaches the run; the evaluation noise does not
change with it, so three seeds' reports show the spread of training alone."""
import json
import subprocess
import sys

import yaml


def test_demo_seed_reaches_the_run_and_the_report(tmp_path):
    out = tmp_path / "demo"
    tiny = ["max_steps=2", "rl_steps=1", "eval_every_steps=0", "sample_every_steps=0", "checkpoint_every_steps=0",
            "eval_num_images=20", "batch_size=4"]
    cmd = [sys.executable, "-m", "flashdmd.cli", "demo", "--seed", "2", "--out", str(out)]
    for kv in tiny:
        cmd += ["--set", kv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training seed 2" in r.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demo_seed"] == 2 and len(metrics["comparison"]) == 3
    assert "training seed 2" in (out / "report.html").read_text()
