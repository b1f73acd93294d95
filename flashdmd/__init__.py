"""flashdmd: Flash-DMD few-step distillation with joint preference RL, on HuggingFace diffusers."""

import logging
import os

__version__ = "0.1.0"

# torchao (the quantised frozen base, networks/quant.py) is imported by diffusers / transformers whenever a model
# loads. On a CPU-only torch it logs "Failed to load ..._C*.so" for its CUDA kernels, torch logs a deprecation per
# Enum it registers, and diffusers one line about torchao tensor classes it no longer finds: lines on every command
# that say nothing to a user. Only those three loggers are lowered to errors.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class FlashDMDError(Exception):
    """An error a user can fix. The CLI prints its message as one line and exits non-zero."""


class Preempted(FlashDMDError):
    """The run stopped on a scheduler's signal (SIGTERM, SIGUSR1) after writing a checkpoint; the message says where
    and how to continue. The CLI prints it as one line (main process) and exits with 128 + ``signum``, as a process
    the signal had killed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)


def launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (their RANK), 0 when launched alone: known before any
    accelerator exists, for what only one process prints."""
    return int(os.environ.get("RANK", "0"))
