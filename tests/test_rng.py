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
