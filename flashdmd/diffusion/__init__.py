"""Schedules, parameterisation conversions and samplers (family-agnostic)."""
from flashdmd.diffusion.parameterization import (PREDICTION_TYPES, bcast, cfg_combine, from_x0_eps,
                                                 to_x0_eps)
from flashdmd.diffusion.schedules import FlowSchedule, Schedule, VPSchedule, shift_sigma

__all__ = ["PREDICTION_TYPES", "bcast", "cfg_combine", "from_x0_eps", "to_x0_eps", "FlowSchedule",
           "Schedule", "VPSchedule", "shift_sigma"]
