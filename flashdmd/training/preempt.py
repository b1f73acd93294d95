"""Preemption: a scheduler's SIGTERM or SIGUSR1 ends a run with a checkpoint of the iteration it was in.

The loops (training/stage1.py ``run_stage1``, training/stage2.py ``run_stage2``) run inside :func:`watch`: the two signals only set a
flag (the handlers are restored when the loop returns; installed from the main thread only). After every Stage-1
iteration and every RL update the loop calls :func:`stop_if_signalled`, which takes the largest flag over the
processes -- one all-reduce of one integer per iteration, as a scheduler may signal only some ranks -- and when any
process was signalled, on every process: writes a checkpoint of the state after that iteration (and the student),
closes the trackers and the data workers and raises :class:`flashdmd.Preempted`. The CLI prints its one line on the
main process and exits with 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1).

The checkpoint is named by :func:`flashdmd.training.checkpoint.checkpoint_name`: ``step_XXXXXXXX`` right after a
student update (when the periodic checkpoint of that step was written at this very state, it is not written
again), else ``step_XXXXXXXX_iterYYYYYYYY`` -- after a critic-only iteration (TTUR) or inside Stage 2's
distillation cycle -- so that it never replaces an older state's checkpoint of the same step. The state holds the
iteration, so ``--resume latest`` continues bit for bit from any iteration.
A second signal while the checkpoint is written changes nothing: the flag is set already, and a checkpoint is
renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from flashdmd import Preempted
from flashdmd.training.checkpoint import checkpoint_name
from flashdmd.training.parallel import max_across

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Flag:
    """The first preemption signal received by this process (0: none)."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:  # the handler: only records (safe at any point of the loop)
        self.signum = self.signum or int(signum)


@contextlib.contextmanager
def watch():
    """Catch :data:`SIGNALS` into a :class:`Flag` for the duration; the previous handlers come back after.
    Off the main thread (where Python cannot install handlers) the flag simply stays 0."""
    flag = Flag()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, flag)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_if_signalled(run, writer, flag: Flag | None) -> None:
    """After an iteration or RL update: when any process got a preemption signal, checkpoint and raise
    :class:`flashdmd.Preempted` on every process. A collective (every rank calls it at the same point)."""
    if flag is None:
        return
    state, real = run.state, run.setup.real
    signum = max_across(flag.signum, run.setup.device)
    if not signum:
        return
    name = checkpoint_name(state, at_step_boundary=state.boundary == (state.iteration, state.rl_steps))
    if state.last_checkpoint is None or Path(state.last_checkpoint).name != name:
        writer.maybe_checkpoint(run, force=True, name=name)
    written = state.last_checkpoint is not None and Path(state.last_checkpoint).name == name
    writer.close()
    if real is not None:  # its DataLoader workers; a later next_batch would restart them at the same position
        real.close()
    where = (f"checkpoint written to {state.last_checkpoint}" if written else
             f"no checkpoint written (non-finite weights); the last good one is {state.last_checkpoint or 'none'}")
    rl = f", RL update {state.rl_steps}" if state.stage == 2 else ""
    raise Preempted(f"preempted by {signal.Signals(signum).name} at step {state.global_step} (iteration "
                    f"{state.iteration}{rl}): {where}; continue with --resume latest", signum)
