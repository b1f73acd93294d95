"""Worker for tests/test_distributed.py: a few Stage-1 iterations under torchrun (N processes) or plain python
(1 process), then rank 0 writes every trainable tensor of every role to OUT/weights.safetensors."""
import sys
from pathlib import Path

from safetensors.torch import save_file

from flashdmd.training.config import DistillConfig
from flashdmd.training.distill import setup, train

teacher, out, batch, method = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
extra = dict(disc_kind="pixel", disc_backbone="world") if method == "flashdmd" else \
    dict(disc_kind="latent", disc_loss="ns", fake_score_ttur=2, fake_score_ema=0.0)
cfg = DistillConfig(method=method, model_teacher=teacher, batch_size=batch, max_steps=2, eval_every_steps=0,
                    sample_every_steps=0, checkpoint_every_steps=0, log_every_steps=1, seed=1,
                    student_timesteps=[999, 499], **extra)
ctx = setup(cfg)
unwrap = ctx.accelerator.unwrap_model


def trainable():
    return {f"{role}.{n}": p.detach().clone().contiguous() for role in ("student", "fake_score", "disc")
            for n, p in unwrap(getattr(ctx, role)).named_parameters() if p.requires_grad}


init = trainable()
train(cfg, out / "run", progress=False, ctx=ctx)
if ctx.accelerator.is_main_process:
    save_file(trainable(), str(out / "weights.safetensors"))
    save_file(init, str(out / "init.safetensors"))
    updates = {role: int(next(iter(o.state.values()))["step"]) for role, o in ctx.opt.items()}
    print("processes", ctx.accelerator.num_processes, ctx.accelerator.distributed_type, "updates", updates)
