"""The names a config chooses among, free of torch and diffusers: a config is checked, and ``flashdmd config-help``
or a command's ``--help`` printed, before the heavy imports. The modules that act on a name import it from here
(``families`` keeps ``FAMILIES`` equal to ``FAMILY_NAMES``; tests/test_cli_help.py checks it)."""
import sys

# model families (flashdmd.families.FAMILIES), in the order the docs list them
FAMILY_NAMES = ("sdxl", "sd3", "flux", "qwenimage", "zimage", "flux2", "flux2-klein")
# how SD3 / SD3.5 count the zero T5 tokens of a folder without text_encoder_3 (flashdmd.families.sd3)
ZERO_T5_MODES = ("auto", "counted", "padded")
# weight-only quantisation of a frozen part (flashdmd.networks.quant)
QUANTS = ("none", "int8", "fp8")


def family_names() -> tuple[str, ...]:
    """The families this process knows: ``flashdmd.families.FAMILIES`` once that is imported (a family added to it
    at run time counts), the shipped ``FAMILY_NAMES`` before (nothing can have been added yet)."""
    families = sys.modules.get("flashdmd.families")
    return tuple(getattr(families, "FAMILIES", FAMILY_NAMES))
