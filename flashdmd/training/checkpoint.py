"""Checkpoints that a crash, a kill or a full disk never leaves half-written, and exact resume.

A checkpoint is a folder ``DIR/checkpoints/step_XXXXXXXX/`` (``step_XXXXXXXX_iterYYYYYYYY`` when a preemption
wrote it after a critic-only iteration of global step X) holding

    roles.safetensors      student, fake score, discriminator heads, (Stage 2) reference -- trainable state
    optim.safetensors      every optimiser's tensors;  optim.json  their scalars and param groups
    rng_rank{r}.safetensors / rng_rank{r}.json   the run's draw counter, the real-image stream's position,
                                                  torch / python RNGs
    state.json             counters (iteration, generator / RL / global steps, stage), the launch (processes,
                           batch size, the process count the learning-rate schedules advance by), lr-scheduler
                           states, the run writer's history
    manifest.json          sha256 and size of every file above -- written last

It is written into ``.tmp-step_XXXXXXXX`` (each file fsynced), then renamed: a reader never sees a partial
folder, and a folder without a matching manifest is ignored. ``latest`` resolves to the newest checkpoint whose
manifest verifies; a corrupt one is reported in one line and the previous good one is used. A write that fails
(full disk, quota, file-size limit) removes the temporary folder and is one line (:mod:`flashdmd.io`).
A checkpoint resumes on another number of processes with the same global batch (:func:`check_global_batch`,
:func:`_load_rng`). Nothing is unpickled: tensors go through safetensors, everything else through JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flashdmd import FlashDMDError, io
from flashdmd.training.parallel import (all_true, canonical, full_optimizer_state, full_state_dict,
                                        load_full_optimizer_state, load_full_state_dict, local_tensors)

PREFIX = "step_"


# ---------------------------------------------------------------------------------------------------
# small I/O helpers

def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict):
    """safetensors refuses tensors that share memory: a tensor held by two roles (the Stage-2 reference shares
    the student's buffers, the LoRA roles the teacher's) is written as a copy under its second name."""
    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[k] = t
    save_file(out, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# what is saved

def _saved_names(module) -> set[str]:
    """Canonical names of what training changes in ``module``: its trainable parameters and the persistent buffers
    of its trained part. Frozen weights are not saved: they come back from the teacher / backbone folders. Nor are
    the buffers of a frozen part (a LoRA denoiser's positional table -- SD3's ``pos_embed.pos_embed``, 57 M values per
    role in SD3-medium -- or a frozen backbone's): a buffer belongs to the nearest module around it that holds
    parameters, and is saved when all of that module's parameters are trainable (a full fine-tune, a
    discriminator head's statistics). A LoRA run's checkpoint is therefore its adapters and heads only."""
    frozen: dict[str, bool] = {}   # module path -> holds a frozen parameter (paths without parameters absent)
    names = set()
    for n, p in module.named_parameters():
        if p.requires_grad:
            names.add(canonical(n))
        parts = n.split(".")[:-1]
        for i in range(len(parts) + 1):
            path = ".".join(parts[:i])
            frozen[path] = frozen.get(path, False) or not p.requires_grad
    for owner_path, owner in module.named_modules():
        for b, _ in owner.named_buffers(recurse=False):
            if b in owner._non_persistent_buffers_set:   # not in state_dict: nothing to save or restore
                continue
            name = f"{owner_path}.{b}" if owner_path else b
            if canonical(name).startswith("backbone."):
                continue
            parts = owner_path.split(".") if owner_path else []
            holder = next((".".join(parts[:i]) for i in range(len(parts), -1, -1) if ".".join(parts[:i]) in frozen),
                          None)
            if holder is None or not frozen[holder]:
                names.add(canonical(name))
    return names


def _roles(setup) -> dict:
    """role -> (module as prepared, names of its saved tensors): the set-up's trained roles. The reference (Stage 2's
    frozen copy of the student) saves the tensors the student trains."""
    roles = {"student": setup.student, "fake_score": setup.fake_score}
    if setup.disc is not None:
        roles["disc"] = setup.disc
    out = {r: (m, _saved_names(m)) for r, m in roles.items()}
    if setup.reference is not None:
        out["reference"] = (setup.reference, out["student"][1])
    return out


def _role_tensors(run) -> dict:
    """role -> {name: full tensor}. A collective under FSDP (every rank calls it; rank 0 gets the tensors)."""
    out = {}
    for role, (module, names) in _roles(run.setup).items():
        full = full_state_dict(module)
        out[role] = {k: v for k, v in full.items() if k in names}
    if run.state.student_ema is not None:
        out["student_ema"] = run.state.student_ema.full_state()
    return out


# which module's parameters each optimiser steps (names in the optimiser state are that module's)
_OPT_MODULE = {"generator": "student", "rl": "student", "fake_score": "fake_score", "disc": "disc"}


def _optim_split(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for name, st in sd["state"].items():
        scalars["state"][name] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{k}"] = v
            else:
                scalars["state"][name][k] = v
    return tensors, scalars


def _optim_join(tensors: dict, scalars: dict) -> dict:
    state = {name: dict(st) for name, st in scalars["state"].items()}
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": scalars["param_groups"]}


def _rng_state(run) -> tuple[dict, dict]:
    """The run's own draws are one counter (training/rng.py); torch's and python's global generators are saved
    too, for anything outside flashdmd that draws from them."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = {"sample_rng": run.state.rng.state_dict(), "python": _jsonable(random.getstate())}
    if run.setup.real is not None:  # the real-image stream's position (global samples consumed) and bad-file counts
        py["data"] = run.setup.real.state_dict()
    return tensors, py


def _jsonable(state):
    return [state[0], list(state[1]), state[2]]


def _pystate(obj):
    return (obj[0], tuple(obj[1]), obj[2])


def _all_finite(run) -> bool:
    """Every trainable tensor of every role finite, on every rank (this rank's shards under FSDP)."""
    ok = all(bool(torch.isfinite(t).all()) for m, _ in _roles(run.setup).values()
             for t in local_tensors(m) if t.is_floating_point())
    ema = run.state.student_ema
    if ema is not None:
        ok = ok and all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())
                        for t in ema.params.values())
    return all_true(ok, run.setup.device)


# ---------------------------------------------------------------------------------------------------
# save / load

def checkpoint_name(state, at_step_boundary: bool = True) -> str:
    """``step_XXXXXXXX`` (global step) for a checkpoint written right after a student update -- the periodic
    ones; ``step_XXXXXXXX_iterYYYYYYYY`` for one written later in the same global step (a preemption after a
    critic-only iteration), so that it never replaces the one of that step. Names sort in the order written."""
    name = f"{PREFIX}{state.global_step:08d}"
    return name if at_step_boundary else f"{name}_iter{state.iteration:08d}"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def save_checkpoint(run, writer, root: Path, keep_last: int, name: str | None = None) -> Path | None:
    """Write a checkpoint of the run's state -- every trained role, optimiser, scheduler, RNG and counter -- into
    ``root/name`` (default :func:`checkpoint_name`). Returns its folder, or None when a role holds a non-finite value
    (a non-finite checkpoint is never written). A failed write on any process (disk full, quota, file-size limit,
    read-only) leaves nothing of the new checkpoint, keeps the previous ones, and is one FlashDMDError on every
    process (the main process's names the folder and about how many bytes a checkpoint needs)."""
    acc, state = run.setup.accelerator, run.state
    if not _all_finite(run):
        warnings.warn(f"step {state.global_step}: non-finite weights, checkpoint not written", stacklevel=2)
        return None
    name = name or checkpoint_name(state)
    tmp, final = root / f".tmp-{name}", root / name
    # every collective first, on every rank: nothing below may leave a rank waiting for one that failed
    parts = {"roles": _role_tensors(run),
             "optims": {role: full_optimizer_state(getattr(run.setup, _OPT_MODULE[role]), opt)
                        for role, opt in state.opt.items()},
             "writer": writer.state_dict()}  # RunWriter: this interval's scalars summed over processes (a collective)
    rng_t, rng_py = _rng_state(run)
    need = tensor_bytes(rng_t.values()) * acc.num_processes + tensor_bytes(
        [v for part in parts["roles"].values() for v in part.values()]
        + [v for sd in parts["optims"].values() for st in sd.get("state", {}).values() for v in st.values()])
    hint = (f"nothing of it was kept; the last good checkpoint is {state.last_checkpoint or 'none'}: free some space "
            "(or raise the limit) and continue with --resume latest")
    cleanup = [tmp] if acc.is_main_process else []
    error = None
    try:
        with io.writing(f"checkpoint {name}", root, need, cleanup=cleanup, hint=hint):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
    except Exception as e:  # noqa: BLE001 -- every rank must reach the agreement below, whatever went wrong
        error = e
    if all_true(error is None, acc.device):
        try:
            with io.writing(f"checkpoint {name}", root, need, cleanup=cleanup, hint=hint):
                _write_tensors(tmp / f"rng_rank{acc.process_index}.safetensors", rng_t)
                _write_json(tmp / f"rng_rank{acc.process_index}.json", rng_py)
                if acc.is_main_process:
                    _write_main_files(run, tmp, parts)
        except Exception as e:  # noqa: BLE001
            error = e
        ok = all_true(error is None, acc.device)
    else:
        ok = False
    _finish(run, tmp, final, root, keep_last, ok, error)
    return final


def _finish(run, tmp: Path, final: Path, root: Path, keep_last: int, ok: bool, error) -> None:
    """Rename the written folder into place and prune old checkpoints -- or, when any process failed, remove it and
    raise on every process."""
    acc = run.setup.accelerator
    if not ok:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise FlashDMDError(f"checkpoint {final.name} was not written: another process could not write its part (its "
                            "error says why)")
    if acc.is_main_process:
        _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    acc.wait_for_everyone()


def _write_main_files(run, tmp: Path, parts: dict) -> None:
    """The main process's files of a checkpoint (everything but the per-rank RNG files), manifest last."""
    state = run.state
    _write_tensors(tmp / "roles.safetensors",
                   {f"{r}/{k}": v for r, part in parts["roles"].items() for k, v in part.items()})
    opt_t, opt_s = {}, {}
    for role, sd in parts["optims"].items():
        t, s = _optim_split(sd)
        opt_t.update({f"{role}/{k}": v for k, v in t.items()})
        opt_s[role] = s
    _write_tensors(tmp / "optim.safetensors", opt_t)
    _write_json(tmp / "optim.json", opt_s)
    _write_json(tmp / "state.json", {
        "iteration": state.iteration, "generator_steps": state.generator_steps, "rl_steps": state.rl_steps,
        "global_step": state.global_step, "stage": state.stage, "stage2_start_iteration": state.stage2_start_iteration,
        "num_processes": run.setup.accelerator.num_processes, "batch_size": run.setup.cfg.run_batch_size,
        "schedule_processes": state.schedule_processes,
        "sched": {k: s.state_dict() for k, s in state.sched.items()}, "writer": parts["writer"]})
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    _write_json(tmp / "manifest.json", {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files})


def _prune(root: Path, keep_last: int):
    for junk in root.glob(".tmp-del-*"):  # left by a kill during an earlier deletion
        shutil.rmtree(junk, ignore_errors=True)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for old in done[:-keep_last] if keep_last > 0 else []:
        _remove(old)


def _remove(folder: Path):
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted ``step_*`` folder (which
    ``latest`` would report as corrupt): rename it out of the ``step_*`` names first (atomic), then delete."""
    trash = folder.with_name(f".tmp-del-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    if folder.exists():
        os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else a one-line reason."""
    man = folder / "manifest.json"
    if not man.is_file():
        return "no manifest (incomplete write)"
    try:
        entries = io.read_json(man)
    except FlashDMDError:
        return "manifest is corrupt"
    for name, meta in entries.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def resolve(run_dir: Path, spec: str) -> Path:
    """``latest`` -> the newest intact checkpoint under run_dir/checkpoints (corrupt ones reported, skipped);
    a path -> that checkpoint, which must verify."""
    if spec != "latest":
        p = Path(spec)
        reason = verify(p) if p.is_dir() else "not a folder"
        if reason:
            raise FlashDMDError(f"checkpoint {p} cannot be used: {reason}")
        return p
    root = run_dir / "checkpoints"
    cands = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True) \
        if root.is_dir() else []
    for p in cands:
        reason = verify(p)
        if reason is None:
            return p
        print(f"warning: checkpoint {p} is unusable ({reason}); trying the previous one")
    raise FlashDMDError(f"no intact checkpoint under {root} to resume from; start without --resume")


def load_checkpoint(run, writer, folder: Path) -> dict:
    """Restore the run's state -- every trained role, optimiser, scheduler, RNG and counter -- from a verified
    checkpoint folder. The run must hold what the checkpoint's stage has (a Stage-2 checkpoint: the reference and
    the RL optimiser, :func:`flashdmd.training.stage2.setup_stage2`); nothing is built here. Returns the run
    writer's saved state (``writer``, when given, gets it through its load_state_dict)."""
    setup, state = run.setup, run.state
    saved = read_state(folder)
    check_global_batch(folder, saved, setup.cfg.run_batch_size, setup.accelerator.num_processes)
    if saved["stage"] == 2 and setup.reference is None:
        raise FlashDMDError(f"checkpoint {folder} is of Stage 2 and this run has not entered it: call "
                            "stage2.setup_stage2(run) before loading it")
    tensors = load_file(str(folder / "roles.safetensors"))  # CPU; loading copies onto the params
    for role, (module, names) in _roles(setup).items():
        part = {k[len(role) + 1:]: v for k, v in tensors.items() if k.startswith(role + "/")}
        missing = names - set(part)
        if missing:
            raise FlashDMDError(f"checkpoint {folder} lacks {len(missing)} tensors of {role} (e.g. {sorted(missing)[0]}): "
                                "was it written with a different config?")
        # only the saved names: an older checkpoint's frozen tensors are never written back (under LoRA the
        # student's frozen base may be the teacher's own tensors)
        load_full_state_dict(module, {k: v for k, v in part.items() if k in names})
    if state.student_ema is not None:
        part = {k[len("student_ema/"):]: v for k, v in tensors.items() if k.startswith("student_ema/")}
        if set(part) != set(state.student_ema.params):
            raise FlashDMDError(f"checkpoint {folder} holds no student EMA matching this run's student_ema setting: "
                                "was it written with a different config?")
        state.student_ema.load_full_state(part)
    _load_optimizers(run, folder, saved)
    _load_rng(run, folder, saved["num_processes"])
    _load_counters(run, saved)
    if writer is not None:
        writer.load_state_dict(saved["writer"])
    return saved["writer"]


def _load_optimizers(run, folder: Path, saved: dict) -> None:
    state = run.state
    opt_t = load_file(str(folder / "optim.safetensors"))
    opt_s = io.read_json(folder / "optim.json")
    try:
        if set(opt_s) != set(state.opt):
            raise KeyError(f"optimisers {sorted(opt_s)} in the checkpoint, {sorted(state.opt)} in this run")
        for role, opt in state.opt.items():
            t = {k[len(role) + 1:]: v for k, v in opt_t.items() if k.startswith(role + "/")}
            load_full_optimizer_state(getattr(run.setup, _OPT_MODULE[role]), opt, _optim_join(t, opt_s[role]))
        for k, s in state.sched.items():
            s.load_state_dict(saved["sched"][k])
    except (KeyError, ValueError) as e:  # another config: other optimisers / parameter groups
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlashDMDError(f"checkpoint {folder} does not match this run's optimisers ({first}): was it written "
                            "with a different config?") from None


def _load_counters(run, saved: dict) -> None:
    state, cfg = run.state, run.setup.cfg
    for k in ("iteration", "generator_steps", "rl_steps", "global_step", "stage"):
        setattr(state, k, saved[k])
    state.stage2_start_iteration = saved.get("stage2_start_iteration")
    if state.stage == 2 and state.stage2_start_iteration is None:  # written before this was recorded
        state.stage2_start_iteration = cfg.run_max_steps * cfg.fake_score_ttur
    # the learning-rate schedules advance by the process count of the run's first launch, forever (see
    # optim.step_schedulers); checkpoints from before this was recorded were written by that launch
    state.schedule_processes = saved.get("schedule_processes", saved["num_processes"])


def read_state(folder: Path) -> dict:
    """A verified checkpoint's state.json: counters, schedules, the process count and batch size it was written with."""
    return io.read_json(folder / "state.json")


def check_global_batch(folder: Path, state: dict, batch_size: int, num_processes: int) -> None:
    """A run resumes on any number of processes with the global batch (batch_size x processes) it was written
    with: every draw is indexed by global sample and the data position is global. Another global batch is one
    line saying which batch_size continues it."""
    n_old = state["num_processes"]
    if "batch_size" not in state:  # written before elastic resume: its batch_size is not recorded
        if n_old != num_processes:
            raise FlashDMDError(f"checkpoint {folder} was written by {n_old} processes and records no batch size; "
                                f"this run has {num_processes}: resume it on {n_old} processes")
        return
    b_old = state["batch_size"]
    g_old, g_new = b_old * n_old, batch_size * num_processes
    if g_old == g_new:
        return
    fix = (f"set run_batch_size={g_old // num_processes} to continue on {num_processes} process(es)"
           if g_old % num_processes == 0 else f"continue on a number of processes that divides {g_old}")
    raise FlashDMDError(f"checkpoint {folder} was written with a global batch of {g_old} ({n_old} processes x "
                        f"{b_old}), this run has {num_processes} x {batch_size} = {g_new}: {fix}")


def _load_rng(run, folder: Path, old_processes: int) -> None:
    """Restore the draws. Global, from rank 0's file: the run's draw counter (this rank's offset in the global
    batch stays the one setup gave it) and the real-image stream's position. Per process, from this rank's own
    file when the checkpoint has one: torch's and python's generators; a rank the checkpoint did not have keeps
    the seeding setup gave it (seed + rank). The stream's read / bad-file counts are per process: on the same
    number of processes each rank gets its own back; on another, rank 0 gets the sums over the old ranks (the
    others start from 0), so the totals and the bad-file fraction carry over."""
    acc, real = run.setup.accelerator, run.setup.real
    rank, same = acc.process_index, old_processes == acc.num_processes
    first = io.read_json(folder / "rng_rank0.json")
    run.state.rng.load_state_dict(first["sample_rng"])
    if real is not None and "data" in first:
        data = dict(first["data"])
        if same:
            own = io.read_json(folder / f"rng_rank{rank}.json")["data"]
            data.update(reads=own["reads"], bad_files=own["bad_files"])
        else:
            olds = [io.read_json(folder / f"rng_rank{r}.json")["data"] for r in range(old_processes)]
            data.update(reads=sum(o["reads"] for o in olds) if rank == 0 else 0,
                        bad_files=sum(o["bad_files"] for o in olds) if rank == 0 else 0)
        real.load_state_dict(data)
    if rank < old_processes:
        rng_t = load_file(str(folder / f"rng_rank{rank}.safetensors"))
        rng_py = io.read_json(folder / f"rng_rank{rank}.json")
        torch.set_rng_state(rng_t["torch_cpu"])
        if "torch_cuda" in rng_t and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_t["torch_cuda"])
        random.setstate(_pystate(rng_py["python"]))
