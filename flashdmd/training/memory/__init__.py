"""`flashdmd plan`'s parts: a live-bytes tracer (trace.py), the byte accounting (accounting.py), the run on the meta
device (meta.py) and the traced phases, which call the run's own step functions (phases.py). The command and the
plan's JSON are in flashdmd/training/plan.py."""
