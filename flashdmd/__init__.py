"""flashdmd: Flash-DMD few-step distillation with joint preference RL, on HuggingFace diffusers."""

__version__ = "0.1.0"


class FlashDMDError(Exception):
    """An error a user can fix. The CLI prints its message as one line and exits non-zero."""
