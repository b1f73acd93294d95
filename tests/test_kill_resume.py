"""SIGKILL at random moments, then `resume latest`: the final weights equal an uninterrupted run bitwise, and no
half-written checkpoint is ever visible or loaded.

The training processes come from tests/kill_worker.py's fork server (imports once; each job is a freshly forked
process that sets up, trains and is killed). The tiny run: SDXL pipeline, batch 2, student steps [999, 499],
6 generator steps, latent discriminator, a checkpoint after every step with the last 2 kept (so every step also
deletes one). Trials:

* ``random``: kill at a random moment of the training (a fraction of the uninterrupted run's duration);
* ``write N``: checkpoint N is written in slow motion (a sleep after each file) and the kill lands after its k-th
  file -- a guaranteed kill during a checkpoint write (N = 1: before any checkpoint is complete);
* ``delete``: old checkpoints are deleted in slow motion and the kill lands after the k-th deleted file.

After every kill: every ``step_*`` folder verifies, everything else in checkpoints/ is a ``.tmp-*`` folder, and
``resolve(latest)`` returns a verified ``step_*`` folder (or reports that there is none, when none is complete).
Then the run is resumed (or restarted when there was no checkpoint) until it finishes.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.training.checkpoint import PREFIX, resolve, verify  # noqa: E402

WORKER = Path(__file__).with_name("kill_worker.py")
REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KILLTEST_SEED", "20261126"))
TIMEOUT = 90  # seconds any one wait may take before the test gives up


class Server:
    """tests/kill_worker.py --serve: one job at a time; stdout lines collected by a reader thread."""

    def __init__(self, teacher: Path, log: Path):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER), "--serve", str(teacher)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env, cwd=REPO)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda ln: ln == "server-ready")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pred, timeout=TIMEOUT) -> str:
        """The next line for which pred is true (lines before it are skipped; an `exit` line is returned too)."""
        end = time.monotonic() + timeout
        while True:
            try:
                ln = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"worker: timed out; its stderr:\n{self.log.read_text()[-3000:]}") from None
            if ln is None:
                raise AssertionError(f"worker server died; its stderr:\n{self.log.read_text()[-3000:]}")
            if pred(ln) or ln.startswith("exit "):
                return ln

    def start(self, out: Path, final: Path, resume: bool, data_real: Path, env: dict | None = None) -> int:
        job = {"out": str(out), "final": str(final), "resume": resume, "data_real": str(data_real), "env": env or {}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.expect(lambda ln: ln.startswith("started ")).split()[1])

    def wait_exit(self, pid: int, seen: str | None = None) -> int:
        ln = seen if seen and seen.startswith(f"exit {pid} ") else self.expect(lambda ln: ln.startswith(f"exit {pid} "))
        assert ln.startswith(f"exit {pid} "), ln
        return int(ln.split()[2])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    from PIL import Image
    real = tmp / "real"
    real.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(real / f"{i}.png")
    server = Server(teacher, tmp / "server_stderr.txt")
    yield server, real, tmp
    server.close()


def check_checkpoints(out: Path) -> Path | None:
    """Every step_* verifies, the rest are .tmp-* folders; resolve(latest) gives a verified step_* (or None)."""
    root = out / "checkpoints"
    entries = sorted(root.iterdir()) if root.is_dir() else []
    for p in entries:
        if p.name.startswith(PREFIX):
            assert verify(p) is None, f"a kill left a broken checkpoint {p.name}: {verify(p)}"
        else:
            assert p.name.startswith(".tmp-"), f"unexpected {p.name} in checkpoints/"
    try:
        got = resolve(out, "latest")
    except FlashDMDError:
        assert not any(p.name.startswith(PREFIX) for p in entries)
        return None
    assert got.name.startswith(PREFIX) and not got.name.startswith(".tmp") and verify(got) is None, got
    return got


def tensors_equal(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def test_sigkill_then_resume_is_bitwise_identical(setting):
    server, real, tmp = setting
    rng = random.Random(SEED)
    t_start = time.monotonic()

    # the uninterrupted run
    ref_final = tmp / "reference.safetensors"
    pid = server.start(tmp / "reference", ref_final, False, real)
    server.expect(lambda ln: ln == "ready")
    t0 = time.monotonic()
    assert server.wait_exit(pid) == 0, f"worker stderr:\n{server.log.read_text()[-3000:]}"
    train_seconds = time.monotonic() - t0
    reference = load_file(str(ref_final))
    assert any(k.startswith("disc/") for k in reference) and any(k.startswith("optim.fake_score/") for k in reference)
    report = [f"reference run: {train_seconds:.1f} s of training (6 generator steps)"]

    # (kind, argument) per kill; each trial ends with a run to completion
    trials = [
        [("random", None), ("random", None)],
        [("write", 1)],                       # during the very first checkpoint: nothing to resume from
        [("write", rng.randint(2, 5))],       # during a later checkpoint write
        [("delete", None)],                   # while an old checkpoint is being deleted
        [("random", None), ("write", 6)],     # random, then during the last checkpoint
        [("random", None)],
    ]
    for i, kills in enumerate(trials):
        out, final = tmp / f"trial{i}", tmp / f"trial{i}.safetensors"
        tt = time.monotonic()
        notes = []
        for kind, arg in kills:
            latest = check_checkpoints(out)
            resume = latest is not None
            if kind == "write" and latest is not None and int(latest.name[len(PREFIX):]) >= arg:
                notes.append(f"(checkpoint {arg} already written: no kill during its write)")
                continue
            env = {}
            if kind == "write":
                env = {"KILLTEST_SLOW_WRITE_STEP": str(arg), "KILLTEST_SLEEP": "0.3"}
            elif kind == "delete":
                env = {"KILLTEST_SLOW_DELETE": "1", "KILLTEST_SLEEP": "0.3"}
            pid = server.start(out, final, resume, real, env)
            ln = server.expect(lambda ln: ln == "ready")
            assert ln == "ready", f"{ln}; worker stderr:\n{server.log.read_text()[-3000:]}"
            if kind == "random":
                delay = rng.uniform(0.05, 0.95) * train_seconds
                time.sleep(delay)
                what = f"random kill after {delay:.2f} s"
            else:
                k = rng.randint(1, 6)
                marker = f"write .tmp-{PREFIX}{arg:08d}/" if kind == "write" else "delete "
                count = 0

                def nth(line):
                    nonlocal count
                    count += line.startswith(marker)
                    return count == k
                ln = server.expect(nth)
                assert not ln.startswith("exit"), f"trial {i}: the run ended before the {kind} kill: {ln}"
                what = f"kill during checkpoint {kind} at file {k} ({ln})"
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = server.wait_exit(pid)
            assert rc in (-signal.SIGKILL, 0), rc
            got = check_checkpoints(out)
            if kind != "random" and rc != 0:  # the kill provably hit a write / delete in progress
                assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
            notes.append(f"{what} -> {'finished first' if rc == 0 else 'killed'}; latest = {got.name if got else None}")
            if rc == 0:
                break
        # resume (or start over when no checkpoint completed) and finish
        latest = check_checkpoints(out)
        if not final.exists():
            pid = server.start(out, final, latest is not None, real)
            resumed = server.expect(lambda ln: ln.startswith("resumed from ") or ln == "done")
            if latest is not None:
                assert resumed.startswith("resumed from ") and Path(resumed.split()[2]).name == latest.name, resumed
            assert server.wait_exit(pid) == 0, f"worker stderr:\n{server.log.read_text()[-3000:]}"
        tensors_equal(reference, load_file(str(final)))
        notes.append(f"resumed from {latest.name if latest else 'scratch'}; final weights bitwise equal")
        report.append(f"trial {i} ({time.monotonic() - tt:.1f} s): " + "; ".join(notes))
    report.append(f"total {time.monotonic() - t_start:.1f} s")
    print("\n".join(report))
