"""A run's set-up: what does not change once training starts, built once by :func:`build` with every check first.

:class:`RunSetup` (frozen) holds the config, the accelerator, the teacher's family (frozen teacher, VAE, text
encoders, schedule), the roles' modules as prepared by accelerate (the objects never change; their trained tensors
do, and a checkpoint saves them), the student's timesteps, the prompt source, the real-image stream, the evaluator and
the sample-grid prompts; from Stage 2 on also the frozen reference and the reward model
(:func:`flashdmd.training.stage2.setup_stage2` replaces the set-up by one that has them). What changes is in
:class:`flashdmd.training.state.TrainState`.

:func:`build` checks everything the run will need -- teacher, resolution, reward model, data, evaluation backends,
the Pixel-GAN's backbone -- before the expensive part, so that a bad path fails first (``flashdmd distill --dry-run``
prints one line per check).
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState, PartialState
from torch import Tensor, nn

from flashdmd import FlashDMDError, plugins
from flashdmd.data import RealImageStream, open_image_source, open_prompt_source, read_prompt_file
from flashdmd.evaluation.real import RealEvaluator
from flashdmd.families import load_family
from flashdmd.networks import compiling
from flashdmd.networks.offload import Offload
from flashdmd.training import residency
from flashdmd.training.config import DistillConfig
from flashdmd.training.ema import StudentEMA
from flashdmd.training.optim import make_optimizers, make_schedulers
from flashdmd.training.reward_model import check_reward_model
from flashdmd.training.rng import SampleRNG
from flashdmd.training.roles import (build_roles, check_compile, check_quant, compile_roles, frozen_dtype,
                                    quantise_frozen)
from flashdmd.training.run import GRID_IMAGES
from flashdmd.training.state import Run, TrainState

EVAL_BACKENDS = ("eval_clip_model", "eval_pickscore_model", "eval_hpsv2_model", "eval_imagereward_model",
                 "eval_fid_inception", "eval_fid_ref")


@dataclass(frozen=True)
class RunSetup:
    """What a run does not change (see the module docstring). ``accelerator`` is None for `flashdmd plan`'s set-up
    on the meta device, which has no processes."""
    cfg: DistillConfig
    accelerator: Accelerator | None
    device: torch.device
    family: object                   # flashdmd.families.Family: VAE, text encoders, schedule, predict
    teacher: nn.Module               # frozen real score (the family's denoiser)
    student: nn.Module               # generator G_theta, as prepared (DDP / FSDP2)
    fake_score: nn.Module            # mu_fake^psi, as prepared
    disc: nn.Module | None           # PixelDiscriminator | LatentClassifierHead | None, as prepared
    timesteps: list[float]           # the K student steps in model units, high noise first
    n_dm: int                        # Flash-DMD: the leading steps that get the DM loss
    resolution: int                  # training image side in pixels (data_resolution or the teacher's)
    prompts: object                  # flashdmd.data.PromptSource: sample(n, rng) -> prompts
    real: RealImageStream | None     # real images (GAN / no backward simulation); its position is checkpointed
    evaluator: object = None         # flashdmd.evaluation.Evaluator or None
    grid_prompts: list = field(default_factory=list)
    reference: nn.Module | None = None   # Stage 2: the student frozen at its start
    reward: nn.Module | None = None      # Stage 2: the reward model
    offload: Offload | None = None       # model_offload: the homed frozen parts and streamed blocks (residency.py)

    def t(self, k: int, n: int) -> Tensor:
        """Student step k's timestep for a batch of n, (n,) float32 on the run's device."""
        return torch.full((n,), float(self.timesteps[k]), device=self.device)


def build(cfg: DistillConfig, accelerator=None, shard=None, log=None) -> Run:
    """Build every role, optimiser, data source and the evaluator; check everything the run will need
    (reward model included) before returning, so that a bad path fails before the expensive part.
    ``shard``: a callable applied to the student and the fake score before their optimisers exist (tests
    shard them with FSDP2's ``fully_shard`` on CPU, where accelerate's FSDP plugin is not available).
    ``log``: a callable receiving one line per check (``flashdmd distill --dry-run`` prints them)."""
    log = log or (lambda line: None)
    check_trackers(cfg)
    acc = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.run_seed + acc.process_index)
    sharded = shard is not None or acc.distributed_type == DistributedType.FSDP
    residency.check(cfg, sharded, acc.num_processes)
    check_compile(cfg, sharded)
    check_selection(cfg)
    family, resolution, timesteps, n_dm, off = _teacher(cfg, acc.device, log, sharded)
    real, prompts = _data(cfg, acc, resolution, log)
    evaluator, grid = _evaluation(cfg, acc.device, prompts)
    log(f"evaluation: {type(evaluator).__name__ if evaluator else 'none'}"
        + (f" ({', '.join(sorted(evaluator.higher_is_better))})" if evaluator else ""))
    if cfg.model_text_cache:
        n = cache_text(cfg, family, prompts, evaluator, grid, real, resolution)
        log(f"text cache: {n} prompts encoded, text encoders released")
    residency.settle(off, family)  # model_offload: the denoiser reaches the device after the text cache (if any)
    with torch.random.fork_rng(devices=[]):   # the check builds networks: it must not move the seeded draws below
        reward_path = check_reward_model(cfg, family)
    if reward_path is not None:
        log(f"reward model: {reward_path} (fits the teacher)")
    roles = build_roles(cfg, family, place=lambda net: residency.place(off, net, acc.device))
    log(f"roles: student, fake score{', discriminator (' + cfg.disc_kind + ')' if roles.disc is not None else ''}")
    for net in (roles.student, roles.fake_score) if shard is not None else ():
        shard(net.to(acc.device))
    if roles.disc is not None and cfg.disc_kind == "pixel":
        residency.add_part(off, "disc_backbone", roles.disc.backbone, family.denoiser)
        residency.place(off, roles.disc, acc.device)
    # pooled heads: fix their standardisation before they are prepared (a resume restores the same statistics)
    if cfg.disc_kind == "pixel" and cfg.disc_head == "pooled":
        with residency.phase(off):
            roles.disc.calibrate(real.evenly_spaced(cfg.disc_calibration_images, cfg.run_batch_size))
    compiled = compile_roles(cfg, roles)
    if compiled:
        log(f"model_compile {cfg.model_compile} ({compiling.BACKEND}), forwards compiled: {', '.join(compiled)}")
    (student, fake_score, disc), opt = make_optimizers(cfg, acc, roles.student, roles.fake_score, roles.disc, off)
    state = TrainState(rng=SampleRNG(cfg.run_seed, acc.process_index, cfg.run_batch_size), opt=opt,
                       schedule_processes=acc.num_processes)  # a resume restores the first launch's count
    state.sched = make_schedulers(cfg, state)
    if cfg.student_ema > 0:
        state.student_ema = StudentEMA(acc.unwrap_model(student), cfg.student_ema)
    if off is not None:
        off.release()   # what the set-up used outside a phase (the null conditioning, a head's sizing) goes back
    setup = RunSetup(cfg=cfg, accelerator=acc, device=acc.device, family=family, teacher=roles.teacher,
                     student=student, fake_score=fake_score, disc=disc, timesteps=timesteps, n_dm=n_dm,
                     resolution=resolution, prompts=prompts, real=real, evaluator=evaluator, grid_prompts=grid,
                     offload=off)
    return Run(setup, state)


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    """The run's Accelerator, with ``model_mixed_precision`` on GPU and on CPU alike (bf16: torch.autocast to
    bfloat16, which torch runs on CPU too), so that a CPU run takes the half-precision path of a GPU run. accelerate
    holds one mixed-precision setting per process; in a single process that ran another setting before (tests,
    benchmarks running several configs one after the other) it is reset to this run's."""
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held not in (None, cfg.model_mixed_precision) and PartialState._shared_state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.model_mixed_precision, cpu=not torch.cuda.is_available())


def _teacher(cfg: DistillConfig, device, log, sharded: bool = False) -> tuple:
    """(the teacher's family at the run's dtypes, the training resolution, the student's steps, n_dm, the run's
    offloading or None)."""
    quant = check_quant(cfg, device, sharded)  # fp8 without a GPU that has it fails before anything is loaded
    family = load_family(cfg.model_teacher, family=cfg.model_family, device=device,
                         dtype=getattr(torch, cfg.model_dtype), frozen_dtype=frozen_dtype(cfg, device),
                         load_device=residency.load_device(cfg))
    quantise_frozen(cfg, family)
    off = residency.install(cfg, family)
    resolution = cfg.data_resolution or family.default_resolution
    family.use_resolution(resolution, resolution)  # a size the VAE or the denoiser cannot take fails here
    family.embedded_guidance = cfg.model_embedded_guidance  # read only by guidance-distilled families (FLUX.1-dev)
    family.zero_t5 = cfg.model_zero_t5  # read only by SD3 without T5
    timesteps, n_dm = student_steps(cfg, family)
    log(f"teacher: {family.path} ({family.name}, {type(family.denoiser).__name__}, {resolution} px, student steps "
        f"[{', '.join(f'{t:.6g}' for t in timesteps)}])")
    log(f"dtypes: frozen parts {str(family.frozen_dtype).removeprefix('torch.')}, trainable weights, optimiser "
        f"states and latents {cfg.model_dtype}" + (f"; quantised: {', '.join(quant)}" if quant else "")
        + ("; each step autocast to bfloat16 (model_mixed_precision)" if cfg.model_mixed_precision == "bf16" else ""))
    for note in family.run_notes():
        log(f"teacher: {note}")
    if off is not None:
        log(f"offload: {cfg.model_offload} ({', '.join(off.parts.groups)} homed on the CPU"
            + (f"; {len(off.groups)} blocks of the base streamed" if off.groups else "") + ")")
    return family, resolution, timesteps, n_dm, off


def _data(cfg: DistillConfig, acc, resolution: int, log) -> tuple[RealImageStream | None, object]:
    """(the real-image stream when the run reads real images, the training prompt source)."""
    real = _real_stream(cfg, acc, resolution) if cfg.disc_kind != "none" or not cfg.student_backward_simulation \
        else None
    if real is not None:
        log(f"real images: {real.source.describe()} -> {resolution} px ({cfg.data_crop} crop), "  # it gives the count
            f"{real.num_workers} worker(s)")
    if cfg.disc_condition == "text":
        _check_captioned(real)
    prompts = open_prompt_source(cfg.data_prompts, captions_of=lambda: _captions(cfg, real, resolution))
    log(f"training prompts: {cfg.data_prompts}")
    return real, prompts


def _check_captioned(real) -> None:
    """disc_condition text judges real images with their captions: up to 64 evenly spaced items must have one (a
    source without captions fails here; a straggler fails at its batch, from discriminator_step)."""
    n = len(real.source)
    for i in sorted({round(k * (n - 1) / 63) for k in range(64)} if n > 1 else {0}):
        if not real.source.caption(i):
            raise FlashDMDError(f"disc_condition: text needs a caption for every real image, and item {i} of "
                                f"{real.source.describe()} has none: add captions (metadata.jsonl text, a text column, "
                                ".txt in the shards) or set disc_condition: none")


def student_steps(cfg: DistillConfig, family) -> tuple[list[float], int]:
    """(the K student timesteps, how many leading ones get the DM loss), checked against the teacher's schedule."""
    timesteps = [float(t) for t in (cfg.student_timesteps or family.default_student_timesteps)]
    lo, hi = family.schedule.t_min, family.schedule.t_max
    if not all(lo <= t <= hi for t in timesteps):  # the schedules would silently clamp them
        raise FlashDMDError(f"config: student_timesteps {timesteps} lie outside the teacher's schedule [{lo:g}, {hi:g}]")
    n_dm = cfg.student_dm_steps if cfg.student_dm_steps is not None else max(1, len(timesteps) - 1)
    if cfg.method == "flashdmd" and n_dm > len(timesteps):
        raise FlashDMDError(f"config: student_dm_steps={n_dm} exceeds the {len(timesteps)} student steps")
    return timesteps, n_dm


def check_trackers(cfg: DistillConfig) -> None:
    """report_to's trackers can be imported (wandb is an optional package)."""
    if "wandb" in cfg.run_report_to and importlib.util.find_spec("wandb") is None:
        raise FlashDMDError("report_to has wandb but wandb is not installed: `pip install wandb`, or drop it from "
                            "report_to (tensorboard is the default)")


def _real_stream(cfg: DistillConfig, acc, resolution: int) -> RealImageStream:
    source = open_image_source(cfg.data_real)
    check_readable(source)
    workers = cfg.data_workers if cfg.data_workers is not None else (0 if plugins.find(cfg.data_real) else 2)
    return RealImageStream(source, resolution, cfg.run_batch_size, crop=cfg.data_crop, seed=cfg.run_seed,
                           process_index=acc.process_index, num_processes=acc.num_processes, num_workers=workers,
                           max_bad_fraction=cfg.data_max_bad_fraction)


def check_readable(source, first: int = 8) -> None:
    """At least one of the first ``first`` images decodes (the stream skips and counts bad files later; a folder
    of nothing readable fails here, before any model work)."""
    errors = []
    for i in range(min(first, len(source))):
        try:
            source.read(i)
            return
        except Exception as e:  # PIL raises many kinds; each is reported by the stream's own count later
            errors.append(f"{e}")
    raise FlashDMDError(f"data_real: none of the first {len(errors)} images of {source.describe()} can be read "
                        f"({errors[0] if errors else 'empty'}): check the files")


def _captions(cfg: DistillConfig, real, resolution: int) -> list[str]:
    """The captions of data_real (for ``data_prompts: captions``), also when the run reads no real images."""
    if real is not None:
        return real.captions()
    with RealImageStream(open_image_source(cfg.data_real), resolution, 1) as stream:
        return stream.captions()


def _evaluation(cfg: DistillConfig, device, prompts) -> tuple[object | None, list[str]]:
    """(the run's held-out evaluator or None, the prompts of its sample grids).

    eval_prompts (+ the metric backends, loaded here so that a wrong path fails now) -> RealEvaluator; else a
    plug-in teacher's own evaluator (the world's FD / alignment / diversity / oracle); else none."""
    if cfg.eval_prompts is not None:
        grid = read_prompt_file(cfg.eval_prompts)
        evaluator = RealEvaluator.from_paths(
            cfg.eval_prompts, cfg.eval_num_images, clip=cfg.eval_clip_model, pickscore=cfg.eval_pickscore_model,
            hpsv2=cfg.eval_hpsv2_model, imagereward=cfg.eval_imagereward_model, fid_inception=cfg.eval_fid_inception,
            fid_ref=cfg.eval_fid_ref, device=device, batch_size=cfg.eval_batch_size) if cfg.eval_every_steps else None
        if evaluator is not None and not evaluator.higher_is_better:
            warnings.warn("eval_prompts without a metric backend: evaluations record speed only (set eval_clip_model, "
                          "eval_pickscore_model, eval_hpsv2_model, eval_imagereward_model or eval_fid_inception + "
                          "eval_fid_ref)", stacklevel=3)
    else:
        grid, evaluator = _plugin_evaluation(cfg, device, prompts)
    return evaluator, (grid * GRID_IMAGES)[:GRID_IMAGES]


def check_selection(cfg: DistillConfig) -> None:
    """Before anything loads: the eval_prompts file exists, eval_split names a split of the plug-in teacher's
    evaluator, and eval_keep_students: improved follows a metric it gives (an eval_prompts evaluator's metrics are
    checked when it is built)."""
    if cfg.eval_prompts is not None and not Path(cfg.eval_prompts).is_file():
        hint = (" (the shipped real-model presets name placeholder paths under /data and /models)"
                if str(cfg.eval_prompts).startswith("/data/") else "")
        raise FlashDMDError(f"config: eval_prompts {cfg.eval_prompts} is not a file{hint}: set eval_prompts to your "
                            "held-out prompt file (one prompt per line; the sample grids use it too)")
    owner = plugins.model_owner(cfg.model_teacher) if cfg.eval_prompts is None else None
    evaluator = getattr(owner, "evaluator", None)
    plugins.check_split(owner, cfg.eval_split, "config: eval_split")
    metrics = getattr(evaluator, "higher_is_better", None)
    if cfg.eval_keep_students == "improved" and metrics is not None and cfg.eval_select_metric not in metrics:
        raise FlashDMDError(f"config: eval_keep_students: improved follows eval_select_metric "
                            f"{cfg.eval_select_metric!r}, which this run's evaluator does not give (it gives "
                            f"{', '.join(metrics)})")


def _plugin_evaluation(cfg: DistillConfig, device, prompts) -> tuple[list[str], object | None]:
    """Without eval_prompts: the grid prompts and evaluator of a plug-in teacher, else prompts from the training
    source and no evaluator."""
    backends = [k for k in EVAL_BACKENDS if getattr(cfg, k) is not None]
    if backends:
        raise FlashDMDError(f"config: {backends[0]} is set but eval_prompts is not: give a text file of held-out "
                            "prompts (one per line) to evaluate on")
    owner = plugins.model_owner(cfg.model_teacher)
    if owner is not None and owner.grid_prompts is not None:
        grid = owner.grid_prompts(GRID_IMAGES)
    else:
        grid = prompts.sample(GRID_IMAGES, SampleRNG(0, 0, GRID_IMAGES))
    evaluator = None
    if cfg.eval_every_steps and owner is not None and owner.evaluator is not None:
        split = {} if cfg.eval_split is None else {"split": cfg.eval_split}
        evaluator = owner.evaluator(cfg.eval_num_images, device, **split)
    if evaluator is None and cfg.eval_every_steps:
        warnings.warn("no held-out metrics for this run: set eval_prompts (a prompt file) and a metric backend "
                      "(eval_clip_model, eval_pickscore_model, eval_hpsv2_model, eval_imagereward_model, "
                      "eval_fid_inception + eval_fid_ref) to get a metric curve and the reward-hacking guard",
                      stacklevel=4)
    return grid, evaluator


def cache_text(cfg: DistillConfig, family, prompts, evaluator, grid: list[str], real, resolution: int) -> int:
    """model_text_cache: encode every prompt the run can ask for -- the training prompts (a source that lists them),
    the sample-grid and evaluation prompts, the real images' captions when a GAN conditions on them (DMD2's latent
    GAN; a text-conditioned Pixel-GAN), "" and the null conditioning -- then release the text encoders. Returns the
    number of prompts cached."""
    listed = getattr(prompts, "prompts", None)
    if listed is None:
        raise FlashDMDError(f"model_text_cache: the training prompts of data_prompts {cfg.data_prompts!r} cannot be "
                            "listed in advance (a plug-in draws them); use a prompt file or captions, or set "
                            "model_text_cache false")
    todo = [""] + list(listed) + list(grid)
    if evaluator is not None:
        held_out = getattr(evaluator, "prompts", None)
        if held_out is None:
            raise FlashDMDError(f"model_text_cache: the evaluator ({type(evaluator).__name__}) does not list its "
                                "prompts; set eval_prompts (a prompt file), eval_every_steps 0, or model_text_cache "
                                "false")
        todo += list(held_out)
    if (cfg.disc_kind == "latent" or cfg.disc_condition == "text") and real is not None \
            and cfg.data_prompts != "captions":
        try:
            todo += _captions(cfg, real, resolution)
        except FlashDMDError:  # no captions: DMD2's real branch uses the null conditioning
            if cfg.disc_condition == "text":
                raise
    family.cache_prompts(todo, cfg.run_batch_size)
    family.release_text_encoders()
    return family.cached_prompts


def holds_run(out: Path) -> bool:
    """Whether the folder already holds a run (a run.json, or a checkpoint)."""
    ckpts = out / "checkpoints"
    return (out / "run.json").is_file() or (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()))
