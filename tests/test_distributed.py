"""Two processes (torchrun, gloo; DDP through accelerate, or FSDP2) equal one process with the same global batch.

Why this is deterministic: every random draw of a run is indexed by global sample (training/rng.py), so rank r
of 2 with batch B draws exactly samples [r*B, (r+1)*B) of what one process with batch 2B draws; every loss is a
per-sample mean (the DMD normaliser is per sample, GroupNorm is per sample), so DDP's gradient average equals
the single process's batch mean. What remains is float round-off of the all-reduce. Adam divides by sqrt(v), so
for an element whose gradient is ~0 round-off can change its update by up to ~lr per step: the largest
elementwise difference is therefore bounded by lr x updates, while the total update of each role must agree
to 1e-2 relative (measured: ~2e-3, one or two such elements out of ~1M; a wrong sharding, seed or reduction
gives differences of order 1).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("method,mode", [("flashdmd", "ddp"), ("dmd2", "ddp"), ("flashdmd", "fsdp"), ("dmd2", "fsdp")])
def test_two_processes_equal_one(tmp_path, method, mode):
    """ddp: accelerate's DDP. fsdp: the student and fake score sharded by FSDP2 (fully_shard, gloo), which also
    exercises the gathered checkpoints: a fresh sharded run restored from the last checkpoint must hold exactly
    the trained weights and the generator's optimiser state."""
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp_path), tmp_path / "sdxl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = _run([sys.executable, str(WORKER), str(teacher), str(tmp_path / "one"), "2", method], env)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                str(WORKER), str(teacher), str(tmp_path / "two"), "1", method, mode], env)
    assert "processes 1" in one and "processes 2" in two and "MULTI_CPU" in two
    if mode == "fsdp":
        line = next(ln for ln in two.splitlines() if ln.startswith("sharded params"))
        assert int(line.split()[2]) > 10, line  # the student really is sharded (DTensor parameters)
        assert "restored-equal True optimizer-equal True" in line, line
        assert int(line.split()[-1]) > 10, line
    a = load_file(str(tmp_path / "one" / "weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "weights.safetensors"))
    w0 = load_file(str(tmp_path / "one" / "init.safetensors"))
    assert torch.equal(torch.cat([v.flatten() for v in w0.values()]),
                       torch.cat([v.flatten() for v in load_file(str(tmp_path / "two" / "init.safetensors")).values()]))
    assert a.keys() == b.keys() and len(a) > 10
    lr_steps = {"student": 2e-5 * 2, "fake_score": 1e-4 * 4, "disc": 1e-4 * 4}
    for role, bound in lr_steps.items():
        keys = [k for k in a if k.startswith(role + ".")]
        if not keys:
            continue
        da = torch.cat([(a[k] - w0[k]).flatten() for k in keys])
        db = torch.cat([(b[k] - w0[k]).flatten() for k in keys])
        assert da.norm() > 0
        rel = ((da - db).norm() / da.norm()).item()
        assert rel < 1e-2, (role, rel)
        assert (da - db).abs().max().item() <= bound, role
