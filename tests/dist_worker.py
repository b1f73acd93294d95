"""Worker for tests/test_distributed.py: a few Stage-1 iterations under torchrun (N processes) or plain python
(1 process), then rank 0 writes every trainable tensor of every role (full tensors, gathered under FSDP) to
OUT/weights.safetensors.

usage: dist_worker.py TEACHER OUT BATCH JOB [JOB ...]      JOB = METHOD-MODE, MODE one | ddp | fsdp

Each job is one run (config()) into OUT/JOB/, one after the other in the same processes (one interpreter start for
all of them: the imports cost more than the tiny runs); every line a job prints starts with "[JOB]".
one: a single process (plain python); ddp / fsdp: under torchrun. fsdp: the student and the fake score are sharded with FSDP2's fully_shard (per transformer / resnet block and at
the root); a checkpoint of the final state is written, and a fresh sharded context restored from that checkpoint must
hold exactly the trained weights and optimiser state.

Everything runs in float64 (model_dtype; see tests/test_distributed.py for why): every role's weights, the latents,
and the real and decoded images the discriminator sees."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from flashdmd.training.config import DistillConfig
from flashdmd.training.distill import setup, train
from flashdmd.training.parallel import full_optimizer_state, full_state_dict
from flashdmd.world import plugin as _world

_world.register()  # the worker chooses the embedded world, as the CLI does


# the runs whose step-1 checkpoint tests/test_distributed.py resumes on one process (elastic resume): both methods,
# both ways of distributing, in two runs
ELASTIC = {("dmd2", "ddp"), ("flashdmd", "fsdp")}


def config(teacher: str, batch: int, method: str, mode: str = "ddp") -> DistillConfig:
    """The run: a checkpoint after every generator step for the ELASTIC runs, the last one under fsdp."""
    extra = dict(disc_kind="pixel", disc_backbone="world") if method == "flashdmd" else \
        dict(disc_kind="latent", disc_loss="ns", fake_score_ttur=2, fake_score_ema=0.0)
    every = 1 if (method, mode) in ELASTIC else 2 if mode == "fsdp" else 0
    return DistillConfig(method=method, model_teacher=teacher, run_batch_size=batch, run_max_steps=2,
                         eval_every_steps=0,
                         run_sample_every_steps=0, run_checkpoint_every_steps=every, run_log_every_steps=1, run_seed=1,
                         student_timesteps=[999, 499], model_dtype="float64", **extra)


def shard(net):
    from torch.distributed.fsdp import fully_shard
    for m in list(net.modules()):
        if type(m).__name__ in ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D"):
            fully_shard(m)
    fully_shard(net)


def trainable(c):
    """Collective under FSDP: every rank calls it; rank 0 gets the tensors."""
    out = {}
    for role in ("student", "fake_score", "disc"):
        net = getattr(c, role)
        names = {n.replace("module.", "", 1) for n, p in net.named_parameters() if p.requires_grad}
        out.update({f"{role}.{k}": v.clone().contiguous() for k, v in full_state_dict(net).items() if k in names})
    return out


def run(teacher: str, out: Path, batch: int, method: str, mode: str, say) -> None:
    cfg = config(teacher, batch, method, mode)
    ctx = setup(cfg, shard=shard if mode == "fsdp" else None)
    init = trainable(ctx)
    dtypes = {p.dtype for role in ("teacher", "student", "fake_score", "disc") for p in getattr(ctx, role).parameters()}
    assert dtypes == {torch.float64}, f"parameters in {dtypes}: model_dtype float64 no longer reaches every role"
    train(cfg, out / "run", progress=False, ctx=ctx)
    final = trainable(ctx)
    if mode == "fsdp":
        from flashdmd.training.checkpoint import load_checkpoint, save_checkpoint
        from flashdmd.training.distill import _WriterState

        class _Writer:  # a checkpoint of the final state (with TTUR 2 the last iteration updates the critics only)
            def state_dict(self):
                return {}
        folder = save_checkpoint(ctx, _Writer(), out / "final", keep_last=1)
        sharded = sum(hasattr(p, "to_local") for p in ctx.student.parameters())
        restored = setup(cfg, shard=shard)
        load_checkpoint(restored, _WriterState(), folder)
        again = trainable(restored)
        opt_a = full_optimizer_state(ctx.student, ctx.opt["generator"])
        opt_b = full_optimizer_state(restored.student, restored.opt["generator"])
        if ctx.accelerator.is_main_process:
            same = all(torch.equal(final[k], again[k]) for k in final)
            same_opt = all(torch.equal(opt_a["state"][n][k], opt_b["state"][n][k]) for n in opt_a["state"]
                           for k in opt_a["state"][n])
            say(f"sharded params {sharded} restored-equal {same} optimizer-equal {same_opt} "
                f"optimizer-tensors {len(opt_a['state'])}")
    if ctx.accelerator.is_main_process:
        save_file(final, str(out / "weights.safetensors"))
        save_file(init, str(out / "init.safetensors"))
        updates = {role: int(next(iter(o.state.values()))["step"]) for role, o in ctx.opt.items()}
        say(f"processes {ctx.accelerator.num_processes} {ctx.accelerator.distributed_type} updates {updates}")


def main():
    teacher, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    for job in sys.argv[4:]:
        method, mode = job.split("-")
        run(teacher, out / job, batch, method, mode, lambda line, job=job: print(f"[{job}] {line}", flush=True))


if __name__ == "__main__":
    main()
