"""Per-sample indexed randomness: a global batch split over processes draws what one process draws."""
import torch

from flashdmd.training.rng import SampleRNG


def test_split_batch_equals_whole_batch():
    whole = SampleRNG(11, rank=0, local_batch=4)
    halves = [SampleRNG(11, rank=r, local_batch=2) for r in range(2)]
    for _ in range(3):
        w = whole.randn((4, 3, 2, 2))
        h = torch.cat([r.randn((2, 3, 2, 2)) for r in halves])
        assert torch.equal(w, h)
        assert torch.equal(whole.rand(4), torch.cat([r.rand(2) for r in halves]))
        assert [g.random() for g in whole.python(4)] == [g.random() for r in halves for g in r.python(2)]
        assert whole.shared_randrange(10) == halves[0].shared_randrange(10) == halves[1].shared_randrange(10)


def test_state_is_a_counter():
    a = SampleRNG(3)
    a.randn((2, 2))
    b = SampleRNG(0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.randn((2, 5)), b.randn((2, 5)))
    assert not torch.equal(SampleRNG(3).randn((2, 5)), SampleRNG(4).randn((2, 5)))


def test_a_resumed_generator_keeps_its_own_place_in_the_global_batch():
    """Elastic resume: the draw counter comes from the checkpoint, the offset from this process's rank and batch.
    A 1-process run with batch 2 continued by rank 1 of 2 (batch 1) draws the second row of what it would have."""
    whole = SampleRNG(7, rank=0, local_batch=2)
    whole.randn((2, 3))
    rank1 = SampleRNG(7, rank=1, local_batch=1)
    rank1.load_state_dict(whole.state_dict())
    assert rank1.offset == 1 and rank1.draw == whole.draw
    assert torch.equal(rank1.randn((1, 4)), whole.randn((2, 4))[1:])


def test_a_rank_without_rng_files_keeps_its_seeding_and_takes_the_global_counters(tmp_path):
    """A checkpoint of 1 process resumed on 2: rank 1 has no rng_rank1 files; it takes the draw counter and the
    data position from rank 0's, keeps its own offset, its torch generator as setup seeded it, and starts its
    read counts at 0 (rank 0 carries the old totals)."""
    import json
    import random
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from flashdmd.training.checkpoint import _load_rng
    saved = SampleRNG(3, rank=0, local_batch=2)
    saved.randn((2, 2))
    data = {"position": 8, "reads": 9, "bad_files": 1}
    (tmp_path / "rng_rank0.json").write_text(json.dumps({"sample_rng": saved.state_dict(), "data": data,
                                                         "python": [3, list(random.getstate()[1]), None]}))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp_path / "rng_rank0.safetensors"))

    class Stream:
        def load_state_dict(self, s):
            self.state = s
    torch.manual_seed(123)
    before = torch.get_rng_state()
    def run_on(rank):  # what _load_rng reads of a run: its set-up's accelerator and stream, its state's draws
        return SimpleNamespace(setup=SimpleNamespace(accelerator=SimpleNamespace(process_index=rank, num_processes=2),
                                                     real=Stream()),
                               state=SimpleNamespace(rng=SampleRNG(3, rank=rank, local_batch=1)))
    ctx = run_on(1)
    _load_rng(ctx, tmp_path, old_processes=1)
    assert (ctx.state.rng.offset, ctx.state.rng.draw) == (1, saved.draw)
    assert ctx.setup.real.state == {"position": 8, "reads": 0, "bad_files": 0}
    assert torch.equal(torch.get_rng_state(), before)
    ctx0 = run_on(0)
    _load_rng(ctx0, tmp_path, old_processes=1)
    assert ctx0.setup.real.state == data and (ctx0.state.rng.offset, ctx0.state.rng.draw) == (0, saved.draw)
