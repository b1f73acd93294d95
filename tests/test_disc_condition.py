"""The text-conditioned Pixel-GAN head (disc_condition: text): a projection discriminator on the family's pooled
text embedding that starts as the unconditional head, and a run that judges real images with their captions and
the student's with its prompts."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.networks.discriminator import PixelDiscriminator, PooledHead  # noqa: E402
from tolerances import U32, assert_close  # noqa: E402


def _feats(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 8, 4, 4, generator=g), torch.randn(b, 16, 2, 2, generator=g)]


def test_projection_head_starts_unconditional_and_then_adds_the_inner_product():
    torch.manual_seed(0)
    plain, cond_head = PooledHead([8, 16], hidden=32), PooledHead([8, 16], hidden=32, cond_dim=12)
    cond_head.load_state_dict(plain.state_dict(), strict=False)  # same MLP; the projection stays at its zero init
    feats, text = _feats(), torch.randn(4, 12) * 30.0
    assert torch.equal(cond_head(feats, text), plain(feats))  # zero-initialised W: exactly the unconditional head
    torch.nn.init.normal_(cond_head.embed.weight)
    z = (PooledHead.pool(feats) - cond_head.mean) / cond_head.std
    h = cond_head.net[1](cond_head.net[0](z))
    c = text / text.pow(2).mean(1, keepdim=True).sqrt()  # unit RMS: the condition's scale does not matter
    w, out = cond_head.embed.weight, cond_head.net[2]
    expected = out(h) + ((c @ w.T) * h).sum(1, keepdim=True)
    # float32, h bitwise the same; the rest mathematically equal: the unit-RMS scaling (~8 u relative to c: a mean
    # of 12 squares, a square root, a division; once more after text / 30), then dot products of 12 (W c) and of
    # 32 + 32 terms (<W c, h>, the output layer), each within n u of the sum of its terms' sizes (Higham's
    # gamma_n |x|.|y|): 8 + 8 + 12 + 64 = 92
    size = (((c.abs() @ w.abs().T) * h.abs()).sum(1) + h.abs() @ out.weight.abs().T[:, 0] + out.bias.abs()).max()
    assert_close(cond_head(feats, text), expected.view(-1, 1, 1, 1), factor=92, mag=size)
    assert_close(cond_head(feats, text / 30.0), expected.view(-1, 1, 1, 1), factor=92, mag=size)
    other = cond_head(feats, torch.randn(4, 12))
    # the logit depends on the caption: another caption moves it by more than round-off
    assert (other - expected.view(-1, 1, 1, 1)).abs().max() > 92 * U32 * size
    with pytest.raises(FlashDMDError, match="needs its condition"):
        cond_head(feats)
    with pytest.raises(FlashDMDError, match="takes none"):
        plain(feats, text)


def test_a_conditional_head_needs_pooled_heads():
    backbone = torch.nn.Identity()
    backbone.feature_channels = [8]
    with pytest.raises(FlashDMDError, match="disc_head: pooled"):
        PixelDiscriminator(backbone, head="patch", cond_dim=12)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_text_conditioned_run_judges_real_images_with_their_captions(tiny_run_folders, family, tmp_path,
                                                                       monkeypatch):
    """Two generator steps on a tiny teacher with the world's captioned real images: the discriminator's real side
    gets the pooled embeddings of the real batch's captions, its fake side and the generator's GAN loss those of the
    student's prompts, and the projection learns (leaves zero)."""
    from flashdmd.training import distill, steps
    cfg = tm.run_config(tiny_run_folders, family, "flashdmd", disc_head="pooled", disc_condition="text",
                        disc_calibration_images=8, run_max_steps=2, student_timesteps=[999, 499])
    ctx = distill.setup(cfg)
    head = ctx.disc.heads[0]
    assert head.embed is not None and head.embed.in_features == ctx.family.null_conditioning(1).pooled_embeds.shape[-1]
    assert not head.embed.weight.any()
    seen = []
    real_batch, encode, pixel_loss = steps.real_batch, steps.encode, steps.pixel_disc_loss

    def spy_real(ctx_, n):
        pixels, captions = real_batch(ctx_, n)
        seen.append(("real captions", list(captions)))
        return pixels, captions

    def spy_loss(ctx_, real, x0, cond_real=None, cond=None):
        seen.append(("disc", cond_real, cond))
        return pixel_loss(ctx_, real, x0, cond_real, cond)

    monkeypatch.setattr(steps, "real_batch", spy_real)
    monkeypatch.setattr(steps, "pixel_disc_loss", spy_loss)
    distill.train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    discs = [s for s in seen if s[0] == "disc"]
    assert len(discs) == 2
    for (_, captions), (_, cond_real, cond) in zip([s for s in seen if s[0] == "real captions"], discs):
        assert all(captions)
        assert torch.equal(cond_real.pooled_embeds, encode(ctx, captions).pooled_embeds)  # the same encoding
        assert cond is not None and cond.pooled_embeds.shape == cond_real.pooled_embeds.shape
    assert head.embed.weight.abs().sum() > 0
