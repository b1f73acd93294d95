"""flashdmd: Flash-DMD few-step distillation with joint preference RL, on HuggingFace diffusers."""

__version__ = "0.1.0"


class FlashDMDError(Exception):
    """An error a user can fix. The CLI prints its message as one line and exits non-zero."""


class Preempted(FlashDMDError):
    """The run stopped on a scheduler's signal (SIGTERM, SIGUSR1) after writing a checkpoint; the message says where
    and how to continue. The CLI prints it as one line (main process) and exits with 128 + ``signum``, as a process
    the signal had killed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
