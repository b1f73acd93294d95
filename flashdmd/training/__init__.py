"""Configs, train state, the Stage-1 / Stage-2 loops, EMA and checkpoints."""
