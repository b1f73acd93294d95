import os

# Never reach the hub from tests: offline, a hub tokenizer id silently loads as an empty tokenizer.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The tests play the face's part: they choose the embedded world (its names: world, world-sdxl, world-sd3),
# as flashdmd.cli and flashdmd.demo do. Nothing inside the package below the face imports it.
from flashdmd.world import plugin as _world  # noqa: E402

_world.register()
