"""What changes during a run, apart from what does not.

* :class:`TrainState` -- everything a run changes as it trains: the counters, the optimisers and their
  learning-rate schedules, the random draws (one counter: training/rng.py), the student's EMA -- what a checkpoint
  saves and restores, together with the trained tensors of the set-up's modules (their objects do not change,
  their tensors do) and the data position of its real-image stream (training/checkpoint.py) -- and this process's
  bookkeeping, which a resume starts afresh: non-finite updates in a row, the latest checkpoint, the last step
  boundary.
* :class:`Run` -- a run being trained: its frozen :class:`flashdmd.training.setup.RunSetup` and its
  :class:`TrainState`. Reading ``run.student`` or ``run.iteration`` reaches whichever part holds the name; writing
  goes to the state by name (``run.state.iteration += 1``) -- the set-up cannot be reassigned. Entering Stage 2
  replaces the set-up by one with the reference and the reward model (``dataclasses.replace``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flashdmd.training.ema import StudentEMA
from flashdmd.training.rng import SampleRNG


@dataclass
class TrainState:
    """The mutable part of a run (see the module docstring)."""
    rng: SampleRNG                       # every random draw of the run; indexed by global sample (training/rng.py)
    opt: dict = field(default_factory=dict)      # role -> optimiser: generator, fake_score, disc; rl in Stage 2
    sched: dict = field(default_factory=dict)    # role -> its learning-rate schedule
    student_ema: StudentEMA | None = None        # when cfg.student_ema > 0
    schedule_processes: int = 1   # the learning-rate schedules advance this many steps an iteration (the first
                                  # launch's process count, kept by every resume: see optim.step_schedulers)
    iteration: int = 0            # Stage-1 iterations (critic updates)
    generator_steps: int = 0      # Stage-1 generator updates (distillation), in both stages
    rl_steps: int = 0             # Stage-2 RL updates
    global_step: int = 0          # all student updates; logging / eval / checkpoint intervals count these
    stage: int = 1
    stage2_start_iteration: int | None = None   # the iteration Stage 2 began at (its cycles are counted from it)
    nonfinite: dict = field(default_factory=dict)   # role -> non-finite updates in a row
    last_checkpoint: str | None = None
    boundary: tuple | None = None     # (iteration, rl_steps) right after the latest student update (global step)

    def after_iteration(self, generator_updated: bool) -> None:
        """Count one Stage-1 iteration (and a global step when it updated the generator)."""
        self.iteration += 1
        if generator_updated:
            self.generator_steps += 1
            self.student_updated()

    def after_rl_update(self) -> None:
        self.rl_steps += 1
        self.student_updated()

    def student_updated(self) -> None:
        self.global_step += 1
        self.boundary = (self.iteration, self.rl_steps)


@dataclass
class Run:
    """A run being trained: ``setup`` (frozen) and ``state`` (see the module docstring)."""
    setup: object    # flashdmd.training.setup.RunSetup
    state: TrainState

    def __getattr__(self, name: str):
        # only names that are not Run's own come here: the set-up's first, then the state's
        parts = self.__dict__
        if "setup" in parts and hasattr(parts["setup"], name):
            return getattr(parts["setup"], name)
        if "state" in parts and hasattr(parts["state"], name):
            return getattr(parts["state"], name)
        raise AttributeError(f"a run has no {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name not in ("setup", "state"):
            raise AttributeError(f"run.{name} = ...: set run.state.{name} (the set-up is frozen)")
        object.__setattr__(self, name, value)
