"""model_compile (flashdmd/networks/compiling.py): a compiled run computes what the eager run computes -- the same
losses over two Flash-DMD iterations of a tiny SD3 LoRA run, within float32 round-off --, resumes bit-exactly, and
keeps the eager parameter names in its checkpoints and saved student; a deep copy of a compiled role runs its own
weights; the combinations it cannot take are one line.

torch.compile runs with backend "aot_eager" here (compiling.BACKEND, monkeypatched): dynamo's graph capture and AOT
autograd's forward / backward graphs, as inductor gets them, with eager kernels -- inductor's C++ compilation of the
same run takes minutes on this CPU (it passes: 1e-9 from eager for model_compile all, measured once by hand). The GPU
check (benchmarks/gpu_check.py, part compile) runs inductor."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from tolerances import U32, assert_close  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.networks import compiling  # noqa: E402
from flashdmd.training.distill import distill_iteration, setup  # noqa: E402
from flashdmd.training.roles import check_compile  # noqa: E402


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")


def _cfg(folders, **kw):
    base = dict(model_lora_rank=2, run_batch_size=1, student_timesteps=[1000, 500], student_lr=1e-3,
                fake_score_lr=1e-3, run_max_steps=2)
    return tm.run_config(folders, "sd3", "flashdmd", **{**base, **kw})


class _Logs:
    """The writer's part that distill_iteration uses: every iteration's losses."""

    def __init__(self):
        self.rows = []

    def accumulate(self, logs):
        self.rows.append({k: float(v) for k, v in logs.items()})

    def bookkeeping(self, run):
        pass


def _two_iterations(cfg):
    run, logs = setup(cfg), _Logs()
    for _ in range(2):
        distill_iteration(run, logs)
    return run, logs.rows


def _factor(folders) -> float:
    """Worst-case round-off factor (tests/tolerances.py: gamma_n, a sum of n terms is n u) of one loss: AOT autograd
    decomposes some ops (layer norm, softmax, GELU and their backward) into others, so each reduction of a forward may
    round in another order. Along one forward of the tiny SD3 the reductions are, per block, the q/k/v and output
    projections and the two MLP matmuls (inner dimension: hidden, hidden, hidden, 4 hidden), the attention scores
    (head dim) and their weighted sum (tokens), and the layer norms (hidden); x3 passes per loss (the student's
    rollout, the fake score and the teacher through the DM gradient), x2 for the backward of the first iteration that
    the second one's weights carry, x10 for the loss's condition (the DM gradient's per-sample normaliser divides by
    a mean |x0 - x_real| that may be ~0.1 of the values' scale)."""
    import json
    c = json.loads((Path(folders["sd3"]) / "transformer" / "config.json").read_text())
    hidden, head = c["num_attention_heads"] * c["attention_head_dim"], c["attention_head_dim"]
    tokens = (c["sample_size"] // c["patch_size"]) ** 2 + 77 * 2
    per_block = 3 * hidden + hidden + 4 * hidden + head + tokens + 2 * hidden
    return c["num_layers"] * per_block * 3 * 2 * 10


def test_compiled_student_gives_the_eager_losses_over_two_iterations(tiny_run_folders):
    folders = tiny_run_folders
    eager, want = _two_iterations(_cfg(folders))
    counters.clear()
    run, got = _two_iterations(_cfg(folders, model_compile="student"))
    s = run.setup
    assert counters["frames"]["ok"] > 0  # dynamo compiled frames: the compiled path ran
    assert compiling.is_compiled(s.student) and compiling.is_compiled(s.fake_score)
    assert not compiling.is_compiled(s.teacher) and not compiling.is_compiled(s.family.vae)
    n_blocks = len(s.student.transformer_blocks)
    compiled = [m for m in s.student.modules() if isinstance(m.__dict__.get("forward"), compiling.CompiledForward)]
    assert len(compiled) == n_blocks
    assert len(want) == len(got) == 2 and want[0].keys() == got[0].keys()
    factor = _factor(folders)
    for i, (w, g) in enumerate(zip(want, got)):
        for k in w:
            assert_close(torch.tensor(g[k]), torch.tensor(w[k]), factor=factor, u=U32,
                         mag=max(abs(w[k]), 1.0), what=f"iteration {i} {k}")
    # the trained adapters after two updates: the same names, the same values within the same bound
    a = {n: p for n, p in eager.setup.student.named_parameters() if p.requires_grad}
    b = {n: p for n, p in s.student.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all("_orig_mod" not in n for n in b)
    for n in a:
        assert_close(b[n].detach(), a[n].detach(), factor=factor, mag=max(float(a[n].abs().max()), 1e-3), what=n)


def test_compile_all_gives_the_eager_losses_over_two_iterations(tiny_run_folders, monkeypatch):
    """model_compile all: every part (teacher, VAE, text encoders, Pixel-GAN backbone) through dynamo's graph capture.
    Backend "eager" here (dynamo's graphs run eagerly, no AOT autograd): under aot_eager on this CPU the VAE's blocks
    stop on a memory-format check that inductor does not make (inductor: 1e-9 from eager, measured by hand)."""
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    folders = tiny_run_folders
    _, want = _two_iterations(_cfg(folders))
    counters.clear()
    run, got = _two_iterations(_cfg(folders, model_compile="all"))
    s = run.setup
    assert counters["frames"]["ok"] > 0
    parts = [s.student, s.fake_score, s.teacher, s.family.vae, s.disc.backbone,
             *[e for e in s.family.text_encoders if e is not None]]
    assert all(compiling.is_compiled(p) for p in parts)
    factor = _factor(folders)
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.keys() == g.keys()
        for k in w:
            assert_close(torch.tensor(g[k]), torch.tensor(w[k]), factor=factor, u=U32,
                         mag=max(abs(w[k]), 1.0), what=f"iteration {i} {k}")


def test_compiled_resume_is_bitwise_and_checkpoints_keep_the_eager_names(tiny_run_folders, tmp_path):
    folders = tiny_run_folders

    def make_cfg(**kw):
        # gradient checkpointing on (the real-checkpoint presets'): each compiled block is a checkpointed region
        return _cfg(folders, model_compile="student", model_gradient_checkpointing=True, **kw)
    tm.assert_resume_bitwise(make_cfg, tmp_path, steps=2)
    ckpt = next((tmp_path / "half" / "checkpoints").glob("step_*"))
    names = list(load_file(str(ckpt / "roles.safetensors")))
    assert names and not [n for n in names if "_orig_mod" in n]
    eager = {n for n, p in setup(_cfg(folders)).setup.student.named_parameters() if p.requires_grad}
    assert {n.split("/", 1)[1] for n in names if n.startswith("student/")} == eager
    saved = [n for f in (tmp_path / "full" / "student").rglob("*.safetensors") for n in load_file(str(f))]
    assert saved and not [n for n in saved if "_orig_mod" in n]


def test_a_copy_of_a_compiled_role_runs_its_own_weights(tiny_run_folders):
    run = setup(_cfg(tiny_run_folders, model_compile="all"))
    s = run.setup
    for part in (s.student, s.fake_score, s.teacher, s.family.vae, s.disc.backbone,
                 *[e for e in s.family.text_encoders if e is not None]):
        assert compiling.is_compiled(part), type(part).__name__
    block = s.student.transformer_blocks[0]
    twin = copy.deepcopy(block)
    assert twin.forward.module is twin and twin.forward.fn is block.forward.fn  # one compiled graph, its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2.0)
        x = torch.randn(1, 16, block.norm1.linear.in_features)
        c = torch.randn(1, 8, block.norm1.linear.in_features)
        temb = torch.randn(1, block.norm1.linear.in_features)
        assert not torch.equal(block(x, c, temb)[1], twin(x, c, temb)[1])
        assert torch.equal(twin(x, c, temb)[1], type(twin).forward(twin, x, c, temb)[1])


@pytest.mark.parametrize("sets, what", [
    (dict(model_compile="student", model_offload="base", model_gradient_checkpointing=True), "model_offload base"),
    (dict(model_compile="all", model_offload="frozen"), "model_compile all with model_offload frozen"),
    (dict(model_compile="yes"), "model_compile must be one of none, student, all"),
])
def test_combinations_it_cannot_take_are_one_line(tiny_run_folders, sets, what):
    with pytest.raises(FlashDMDError, match=what) as e:
        _cfg(tiny_run_folders, **sets)
    assert "\n" not in str(e.value)


def test_fsdp2_and_a_denoiser_without_blocks_are_one_line(tiny_run_folders):
    with pytest.raises(FlashDMDError, match="model_compile student with FSDP2 is not supported") as e:
        check_compile(_cfg(tiny_run_folders, model_compile="student"), sharded=True)
    check_compile(_cfg(tiny_run_folders), sharded=True)  # none: nothing to refuse
    with pytest.raises(FlashDMDError, match="Linear has no blocks of JointTransformerBlock") as b:
        compiling.compile_blocks(torch.nn.Linear(2, 2), ("JointTransformerBlock",), whole=False)
    assert "\n" not in str(e.value) + str(b.value)
