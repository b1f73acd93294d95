"""What a weight-only quantised frozen base (model_frozen_quant int8 / fp8) costs the teacher, at every student step.

For each teacher -- the shipped world teachers (real trained weights; their presets' student steps and
dm_guidance_scale) and the tiny random SDXL / SD3 / FLUX folders of tests/tiny_models.py (the family's default
student steps, DistillConfig's default dm_guidance_scale) -- both loaded with frozen dtype float32, one copy
quantised:

* clean latents x0: world teachers: real images (the world's Fashion-MNIST train split) encoded by the teacher's
  VAE, with their captions; tiny teachers: the unquantised teacher's own 4-step samples of world prompts;
* at each student timestep t: x_t = add_noise(x0, fixed noise, t);
* (a) the teacher's x0 with the DM loss's CFG, quantised against unquantised: relative RMS error (over the batch)
  and max abs error;
* (b) the cosine, per sample, between the DM-loss gradients (flashdmd.losses.dmd_gradient) with the unquantised and
  the quantised teacher as the "real" score and one fake score: ``fake_ref`` = the unquantised teacher without CFG
  (the fake score at initialisation of an unquantised run, the same for both gradients), and ``fake_same`` = each
  teacher's own CFG-1 prediction (the fake score at initialisation of each run: in an int8 run the fake score shares
  the int8 base); mean and min over the batch;
* the time of one teacher forward (the DM loss's CFG pair, the whole batch), the median of 3, each way.

fp8 needs a float8 GPU; elsewhere its rows say "not run". Resumable: rows already in --out are kept; the JSON is
rewritten atomically after each row.

    python benchmarks/quant_cost.py           # ~6 min, one thread (2 shared cores): benchmarks/results/quant_cost.json
    python benchmarks/quant_cost.py --quick   # a smoke run (~35 s), written to a temporary folder
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from flashdmd.families import load_family  # noqa: E402
from flashdmd.losses import dmd_gradient  # noqa: E402
from flashdmd.networks.quant import FP8_CAPABILITY, quantise  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.world import plugin  # noqa: E402
from flashdmd.world.prompts import eval_prompts  # noqa: E402

WORLD = {"world-sdxl": "configs/world_sdxl_flashdmd.yaml", "world-sd3": "configs/world_sd3_flashdmd.yaml"}
TINY = ("tiny-sdxl", "tiny-sd3", "tiny-flux")


def _atomic_write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _fp8_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_CAPABILITY


def _settings(name: str) -> tuple[list[float] | None, float]:
    """(student timesteps or None = the family's default, dm_guidance_scale)."""
    if name in WORLD:
        p = yaml.safe_load((ROOT / WORLD[name]).read_text())
        return [float(t) for t in p["student_timesteps"]], float(p["dm_guidance_scale"])
    return None, DistillConfig.__dataclass_fields__["dm_guidance_scale"].default


def _clean_batch(name: str, fam, n: int, dev) -> tuple[torch.Tensor, list[str]]:
    """Fixed clean latents and their prompts (see the module docstring)."""
    if name in WORLD:
        src = plugin.WorldImageSource()
        idx = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))[:n].tolist()
        images, prompts = zip(*(src.read(i) for i in idx))
        with torch.no_grad():
            return fam.encode_images(torch.stack(images).to(dev)), list(prompts)
    prompts = eval_prompts(n)[0]
    res = fam.default_resolution
    noise = torch.randn((n,) + tuple(fam.latent_shape(res, res)), generator=torch.Generator().manual_seed(1))
    return fam.sample_latents(fam.denoiser, fam.encode_prompts(prompts), noise.to(dev)), prompts


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def _time_forward(fam, net, x, t, cond, w, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            fam.predict(net, x, t, cond, guidance_scale=w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _at_t(ref, q, x0, noise, t_val: float, cond, w: float) -> dict:
    t = torch.full((x0.shape[0],), t_val, device=x0.device)
    x_t = ref.schedule.add_noise(x0, noise, t)
    with torch.no_grad():
        real_r, _ = ref.predict(ref.denoiser, x_t, t, cond, guidance_scale=w)
        real_q, _ = q.predict(q.denoiser, x_t, t, cond, guidance_scale=w)
        fake_r, _ = ref.predict(ref.denoiser, x_t, t, cond)
        fake_q, _ = q.predict(q.denoiser, x_t, t, cond)
    d = (real_q - real_r).double()
    g_ref = dmd_gradient(x0, real_r, fake_r)
    cos_ref = _cos(g_ref, dmd_gradient(x0, real_q, fake_r))
    cos_same = _cos(g_ref, dmd_gradient(x0, real_q, fake_q))
    return {"t": t_val,
            "x0_rel_rms": float(d.pow(2).mean().sqrt() / real_r.double().pow(2).mean().sqrt()),
            "x0_max_abs": float(d.abs().max()), "x0_ref_max_abs": float(real_r.abs().max()),
            "grad_cos_fake_ref_mean": float(cos_ref.mean()), "grad_cos_fake_ref_min": float(cos_ref.min()),
            "grad_cos_fake_same_mean": float(cos_same.mean()), "grad_cos_fake_same_min": float(cos_same.min())}


def _load(name: str, folders: dict, dev):
    path = name if name in WORLD else str(folders[name.split("-", 1)[1]])
    return load_family(path, device=dev, dtype=torch.float32, frozen_dtype=torch.float32)


def run_row(name: str, kind: str, folders: dict, n: int, dev) -> dict:
    steps, w = _settings(name)
    ref, q = _load(name, folders, dev), _load(name, folders, dev)
    steps = steps or [float(s) for s in ref.default_student_timesteps]
    quantise(q.denoiser, kind)
    x0, prompts = _clean_batch(name, ref, n, dev)
    cond = ref.encode_prompts(prompts)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    per_t = [_at_t(ref, q, x0, noise, t, cond, w) for t in steps]
    t_mid = torch.full((n,), steps[len(steps) // 2], device=dev)
    x_mid = ref.schedule.add_noise(x0, noise, t_mid)
    return {"teacher": name, "quant": kind, "batch": n, "dm_guidance_scale": w, "student_timesteps": steps,
            "clean_latents": "real images, VAE-encoded" if name in WORLD else "the teacher's own 4-step samples",
            "per_timestep": per_t,
            "forward_s": {"none": _time_forward(ref, ref.denoiser, x_mid, t_mid, cond, w),
                          kind: _time_forward(q, q.denoiser, x_mid, t_mid, cond, w)},
            "threads": torch.get_num_threads(), "device": str(dev)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 4, world-sdxl and tiny-sdxl only, a temporary --out")
    p.add_argument("--out", default=None)
    p.add_argument("--batch-world", type=int, default=64)
    p.add_argument("--batch-tiny", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    plugin.register()
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.TemporaryDirectory()
    default = Path(tmp.name) / "quant_cost.json" if a.quick else ROOT / "benchmarks/results/quant_cost.json"
    out = Path(a.out or default)
    teachers = ["world-sdxl", "tiny-sdxl"] if a.quick else [*WORLD, *TINY]
    nw, nt = (4, 2) if a.quick else (a.batch_world, a.batch_tiny)
    import tiny_models as tm
    folders = tm.run_folders(Path(tmp.name)) if any(t in TINY for t in teachers) else {}
    rows = json.loads(out.read_text()) if out.exists() else {}
    for name in teachers:
        for kind in ("int8", "fp8"):
            key = f"{name}/{kind}"
            if key in rows:
                continue
            if kind == "fp8" and not _fp8_ok():
                rows[key] = {"teacher": name, "quant": kind, "not_run": "needs a float8 GPU (compute capability 8.9+)"}
            else:
                t0 = time.perf_counter()
                rows[key] = run_row(name, kind, folders, nw if name in WORLD else nt, dev)
                rows[key]["row_s"] = round(time.perf_counter() - t0, 1)
            _atomic_write(out, rows)
            r = rows[key]
            print(key, r.get("not_run") or " ".join(
                f"t={x['t']:g}: rel {x['x0_rel_rms']:.2e} cos {x['grad_cos_fake_ref_mean']:.4f}/"
                f"{x['grad_cos_fake_ref_min']:.4f}" for x in r["per_timestep"]), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
