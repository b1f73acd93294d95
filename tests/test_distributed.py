"""Two processes (torchrun, gloo; DDP through accelerate, or FSDP2) equal one process with the same global batch.

Why this is deterministic: every random draw of a run is indexed by global sample (training/rng.py), so rank r
of 2 with batch B draws exactly samples [r*B, (r+1)*B) of what one process with batch 2B draws; every loss is a
per-sample mean (the DMD normaliser is per sample, GroupNorm is per sample), so DDP's gradient average equals
the single process's batch mean. What remains is round-off: kernels sum in an order that depends on the batch
size and the CPU's vector width, and the all-reduce adds in yet another order. Adam divides by sqrt(v), so an
element whose gradient is ~0 turns round-off above its eps into an update of up to ~lr. In float32 the two runs
differed by up to 1.25e-2 relative on AVX-512 CPUs (2e-3 on AVX2) -- no margin below any bound worth asserting.
So the worker runs everything in float64 (tests/dist_worker.py): the runs then differ by at most 4e-11 relative
(largest element: 5e-9 of the largest update), and the test asserts TOLERANCE = 1e-6 for each role, both for the
norm of the difference of the total updates (relative to the update's norm) and for its largest element
(relative to the largest element of the update).

How it fails when the distributed path is wrong (each measured by breaking it on purpose, DDP and FSDP): a rank
drawing another rank's data (every rank the samples of rank 0), or gradients not all-reduced: relative difference
0.4-1.1; rank 1 seeded differently: 0.4-1.3; gradients summed instead of averaged: 2e-4 to 3e-2 (Adam is nearly
blind to a gradient scale, which shows only through eps and clipping; the earlier float32 bound of 1e-2 let it
through for every Flash-DMD role). A float32 step left on the path shows as well: FSDP's clip_grad_norm_ combining
the sharded and the plain norms in float32 gave 8e-6 (dmd2-fsdp).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from dist_worker import ELASTIC  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
TOLERANCE = 1e-6  # float64 round-off reaches ~4e-11; any error of the distributed path is far above (docstring)


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def assert_same_updates(want: dict, got: dict, w0: dict) -> None:
    """Per role, the total update of ``got`` (its weights minus ``w0``) equals that of ``want`` within TOLERANCE:
    the norm of the difference relative to the update's norm, and its largest element relative to the update's."""
    for role in ("student", "fake_score", "disc"):
        keys = [k for k in want if k.startswith(role + ".")]
        if not keys:
            continue
        dw = torch.cat([(want[k] - w0[k]).flatten() for k in keys])
        dg = torch.cat([(got[k] - w0[k]).flatten() for k in keys])
        assert dw.norm() > 0
        rel = ((dw - dg).norm() / dw.norm()).item()
        worst = ((dw - dg).abs().max() / dw.abs().max()).item()
        assert rel < TOLERANCE and worst < TOLERANCE, (role, f"relative {rel:.2e}, largest element {worst:.2e}")


COMBOS = [("flashdmd", "ddp"), ("dmd2", "ddp"), ("flashdmd", "fsdp"), ("dmd2", "fsdp")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, launched once: the one-process references of both methods (one python process) and
    the four 2-process runs (one torchrun: the jobs run one after the other in the same two processes -- the
    interpreter starts and imports cost more than the tiny runs). Returns the teacher, the output folder and each
    job's printed lines."""
    tmp = tmp_path_factory.mktemp("distributed")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = _run([sys.executable, str(WORKER), str(teacher), str(tmp / "one"), "2", "flashdmd-one", "dmd2-one"], env)
    with socket.socket() as sock:   # a port free now: the suite's workers may run this fixture side by side
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                str(WORKER), str(teacher), str(tmp / "two"), "1"] + [f"{m}-{d}" for m, d in COMBOS], env)
    lines = {}
    for ln in (one + two).splitlines():
        if ln.startswith("["):
            job, _, rest = ln[1:].partition("] ")
            lines.setdefault(job, []).append(rest)
    return teacher, tmp, lines


@pytest.mark.parametrize("method,mode", COMBOS)
def test_two_processes_equal_one(runs, tmp_path, method, mode):
    """ddp: accelerate's DDP. fsdp: the student and fake score sharded by FSDP2 (fully_shard, gloo), which also
    exercises the gathered checkpoints: a fresh sharded run restored from the last checkpoint must hold exactly
    the trained weights and the generator's optimiser state. Then, for dist_worker.ELASTIC (dmd2-ddp, flashdmd-fsdp),
    the 2-process run's first checkpoint resumed on one process (resumed_on_one_process)."""
    teacher, tmp, lines = runs
    job, ref = f"{method}-{mode}", f"{method}-one"
    one, two = "\n".join(lines.get(ref, [])), "\n".join(lines.get(job, []))
    assert "processes 1" in one and "processes 2" in two and "MULTI_CPU" in two, (one, two)
    if mode == "fsdp":
        line = next(ln for ln in two.splitlines() if ln.startswith("sharded params"))
        assert int(line.split()[2]) > 10, line  # the student really is sharded (DTensor parameters)
        assert "restored-equal True optimizer-equal True" in line, line
        assert int(line.split()[-1]) > 10, line
    a = load_file(str(tmp / "one" / ref / "weights.safetensors"))
    b = load_file(str(tmp / "two" / job / "weights.safetensors"))
    w0 = load_file(str(tmp / "one" / ref / "init.safetensors"))
    assert torch.equal(torch.cat([v.flatten() for v in w0.values()]),
                       torch.cat([v.flatten() for v in load_file(str(tmp / "two" / job / "init.safetensors")).values()]))
    assert a.keys() == b.keys() and len(a) > 10
    assert {v.dtype for v in a.values()} == {torch.float64}
    assert_same_updates(a, b, w0)
    if (method, mode) in ELASTIC:
        resumed_on_one_process(teacher, method, mode, tmp_path, tmp / "two" / job, b, w0)


def resumed_on_one_process(teacher, method, mode, tmp_path, run_dir, two: dict, w0: dict):
    """Elastic resume: the 2-process run's first checkpoint (global batch 2 x 1) continued on one process with
    batch_size 2 ends where the uninterrupted 2-process run ended, within the same float64 bound; the learning-rate
    schedules keep advancing by the first launch's 2 processes; the data stream's counts are the old ranks' sums.
    With batch_size 1 (global batch 1) the resume is refused in one line, before any model is loaded or the run folder
    is written (checked once: the check does not depend on the method or the sharding)."""
    import json

    from dist_worker import config, trainable

    from flashdmd import FlashDMDError
    from flashdmd.training.checkpoint import load_checkpoint
    from flashdmd.training.distill import STAGE1_SCHEDULERS, _WriterState, setup, train
    folder = run_dir / "run" / "checkpoints" / "step_00000001"
    if (method, mode) == ("dmd2", "ddp"):
        from unittest import mock

        from flashdmd.training import distill
        with pytest.raises(FlashDMDError, match=r"global batch of 2 \(2 processes x 1\), this run has 1 x 1 = 1: "
                                                r"set run_batch_size=2 to continue on 1 process"), \
                mock.patch.object(distill, "setup", side_effect=AssertionError("a model was loaded first")):
            train(config(str(teacher), 1, method, mode), tmp_path / "refused", progress=False, resume=str(folder))
        assert not (tmp_path / "refused").exists()
    cfg = config(str(teacher), 2, method, mode)
    ctx = setup(cfg)
    load_checkpoint(ctx, _WriterState(), folder)  # what train's resume loads; looked at before it trains on
    ranks = [json.loads((folder / f"rng_rank{r}.json").read_text()) for r in range(2)]
    assert ctx.real.stats()["reads"] == sum(r["data"]["reads"] for r in ranks) > ranks[0]["data"]["reads"]
    assert ctx.rng.offset == 0 and ranks[1]["sample_rng"]["offset"] == 1  # this process's place in the global batch
    train(cfg, tmp_path / "elastic", progress=False, ctx=ctx, resume=str(folder))
    assert ctx.schedule_processes == 2
    assert all(ctx.sched[k].last_epoch == 2 * ctx.iteration for k in STAGE1_SCHEDULERS if k in ctx.sched)
    one = trainable(ctx)
    assert one.keys() == two.keys()
    assert_same_updates(two, one, w0)
