"""Speed benchmark (BENCHMARKS.md "Speed"): in one process and one run,
  * images/s of the K-step student vs the teacher at 25 and 50 steps with CFG;
  * the time of one Stage-1 iteration broken down by role (backward simulation, student forward+backward,
    teacher forward, fake-score forward and update, VAE decode, discriminator) and the share spent outside
    network passes;
  * peak memory (CPU RSS; CUDA max allocated on a GPU).

    .venv/bin/python benchmarks/speed.py --config configs/world_sdxl_flashdmd.yaml --iterations 20 \\
        --out benchmarks/results/speed_cpu.json
"""
import argparse
import json
import os
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from flashdmd.inference import Model, load_model, sample_images  # noqa: E402
from flashdmd.training import distill, stage1, steps  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.world import plugin as _world  # noqa: E402

_world.register()  # benchmarks are a face: they choose the embedded world


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """Per label: ``total`` = exclusive time (nested labels charged to the innermost), ``inclusive`` = time
    inside the label including nested ones (e.g. backward simulation includes its student forwards)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.inclusive = defaultdict(float)
        self.stack = []

    @contextmanager
    def __call__(self, label):
        sync()
        t0 = time.perf_counter()
        if self.stack:  # pause the parent
            parent, start = self.stack[-1]
            self.total[parent] += t0 - start
        self.stack.append([label, t0])
        try:
            yield
        finally:
            sync()
            t1 = time.perf_counter()
            lab, start = self.stack.pop()
            self.total[lab] += t1 - start
            self.inclusive[lab] += t1 - t0
            if self.stack:
                self.stack[-1][1] = t1


def instrument(ctx, timer):
    """Wrap the network calls of one run so each is charged to its role."""
    fam = ctx.family
    roles = {id(ctx.student): "student", id(ctx.teacher): "teacher", id(ctx.fake_score): "fake_score"}
    predict, decode = fam.predict, fam.decode_latents

    def timed_predict(net, *a, **k):
        with timer(f"{roles.get(id(net), 'other')} forward"):
            return predict(net, *a, **k)

    def timed_decode(*a, **k):
        with timer("vae decode"):
            return decode(*a, **k)
    fam.predict, fam.decode_latents = timed_predict, timed_decode
    if ctx.disc is not None:
        fwd = ctx.disc.forward

        def timed_disc(*a, **k):
            with timer("discriminator forward"):
                return fwd(*a, **k)
        ctx.disc.forward = timed_disc
    bs = steps.backward_simulate

    def timed_bs(*a, **k):
        with timer("backward simulation"):
            return bs(*a, **k)
    steps.backward_simulate = timed_bs
    opt = steps.optimise  # the Stage-1 steps' optimiser update (training/optim.py)

    def timed_opt(c, role, loss, params):
        with timer(f"{role} backward+step"):
            return opt(c, role, loss, params)
    steps.optimise = timed_opt
    enc = stage1.encode  # the Stage-1 loop's prompt encoding

    def timed_enc(*a, **k):
        with timer("text encoders"):
            return enc(*a, **k)
    stage1.encode = timed_enc


def iteration_breakdown(cfg, iterations, out_dir):
    ctx = distill.setup(cfg)
    from flashdmd.training.run import RunWriter
    writer = RunWriter(out_dir, cfg, ctx)
    distill.distill_iteration(ctx, writer)  # warm-up
    timer = Timer()
    instrument(ctx, timer)
    sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
        with timer("outside network passes"):
            distill.distill_iteration(ctx, writer)
    wall = (time.perf_counter() - t0) / iterations
    per = {k: v / iterations for k, v in timer.total.items()}
    incl = {k: v / iterations for k, v in timer.inclusive.items() if k != "outside network passes"}
    return {"seconds_per_iteration": wall, "breakdown_seconds": per, "inclusive_seconds": incl,
            "outside_share": per.get("outside network passes", 0.0) / wall, "batch_size": cfg.run_batch_size}


def throughput(model: Model, prompts, steps_, reps=1):
    sample_images(model, prompts[:8], steps=steps_)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sample_images(model, prompts, steps=steps_)
    sync()
    return len(prompts) * reps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/world_sdxl_flashdmd.yaml")
    p.add_argument("--student", default=None, help="a distill run folder (default: the config's teacher "
                   "weights used as a 4-step student -- same network cost)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="benchmarks/results/speed.json")
    a = p.parse_args()
    cfg = DistillConfig.from_sources(a.config, a.set + ["eval_every_steps=0", "run_sample_every_steps=0",
                                                       "run_checkpoint_every_steps=0"])
    teacher = load_model(cfg.model_teacher)
    if a.student:
        student = load_model(a.student)
    else:
        fam = teacher.family
        student = Model(fam, fam.denoiser, "student", [float(t) for t in fam.default_student_timesteps], 1.0, True)
    from flashdmd.world.prompts import eval_prompts
    prompts = eval_prompts(a.images)[0]
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"}
    res["images_per_second"] = {f"student {len(student.timesteps)} steps": throughput(student, prompts, None),
                                "teacher 25 steps CFG": throughput(teacher, prompts, 25),
                                "teacher 50 steps CFG": throughput(teacher, prompts, 50)}
    ips = res["images_per_second"]
    res["speedup_vs_50_step_teacher"] = ips[f"student {len(student.timesteps)} steps"] / ips["teacher 50 steps CFG"]
    res["stage1_iteration"] = iteration_breakdown(cfg, a.iterations, Path(a.out).with_suffix(".run"))
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
