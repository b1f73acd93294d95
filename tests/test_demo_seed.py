"""`flashdmd demo --seed N` (issue 16, item 4): the training seed reaches the run; the evaluation noise does not
change with it, so three seeds' reports show the spread of training alone."""
import json

import yaml

from flashdmd import cli


def test_demo_seed_reaches_the_run_and_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = ["run_max_steps=2", "rl_steps=1", "eval_every_steps=0", "run_sample_every_steps=0",
            "run_checkpoint_every_steps=0",
            "eval_num_images=20", "run_batch_size=4"]  # 20: two images per class, the least diversity needs
    argv = ["demo", "--seed", "2", "--out", str(out)] + [a for kv in tiny for a in ("--set", kv)]
    assert cli.main(argv) in (0, None)
    assert "training seed 2" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["run_seed"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demo_seed"] == 2 and len(metrics["comparison"]) == 3
    assert "training seed 2" in (out / "report.html").read_text()
