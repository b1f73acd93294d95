"""FID Inception-v3 in plain torch (no torchvision) and reference statistics.

The network is pytorch-fid's ``fid_inception_v3``: torchvision's Inception-v3 layout (``num_classes=1008``,
no aux head) with the FID patches -- ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1`` average-pool
without counting the zero padding (TensorFlow's behaviour) and ``FIDInceptionE_2`` max-pools its pool branch.
Parameters and buffers carry exactly torchvision's / pytorch-fid's names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``), so the released weight file
``pt_inception-2015-12-05-6726825d.pth`` (a plain state_dict, the TF FID graph ported to torch) loads as it is.

Features: the 2048-d output of the final average pool ("pool3"). Input: images in [-1, 1] are quantised to
8-bit levels (what a saved PNG holds, which is what pytorch-fid reads), resized to 299x299 bilinearly
(``align_corners=False``, no antialias: pytorch-fid's ``F.interpolate``) and fed in [-1, 1] -- the same
numbers pytorch-fid computes from [0, 1] input with ``2x - 1`` after its resize.

Weight files: ``.pth`` / ``.pt`` read with ``torch.load(weights_only=True)`` (never a full unpickle), or a
``.safetensors`` conversion with the same keys. Reference statistics: a folder of images (each resized to 299
like pytorch-fid does, no crop), or precomputed ``.npz`` (pytorch-fid's ``mu`` / ``sigma``, e.g. from
``python -m pytorch_fid --save-stats``) or ``.safetensors`` (``mu`` / ``sigma``, written by ``flashdmd eval-stats``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd import FlashDMDError, io
from flashdmd.evaluation.backends import quantize
from flashdmd.evaluation.metrics import feature_stats
from flashdmd.families import network_call

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
INPUT_SIZE = 299   # pytorch-fid's resize target (tests lower it to run a random full network quickly)
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that ignores the zero padding (TensorFlow's average, the FID patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (pool="avg": TF average pool) or ``FIDInceptionE_2`` (pool="max")."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3; :meth:`features` gives the (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the weight file; unused for FID

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        for m in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = m(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = m(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def resize_299(x01: Tensor) -> Tensor:
    """pytorch-fid's resize: bilinear to 299x299 (:data:`INPUT_SIZE`), align_corners=False, no antialias;
    the identity when the images already have that size."""
    size = (INPUT_SIZE, INPUT_SIZE)
    if tuple(x01.shape[-2:]) == size:
        return x01
    return F.interpolate(x01, size=size, mode="bilinear", align_corners=False)


class FIDInception:
    """Loaded FID Inception: ``features(images in [-1, 1]) -> (N, 2048)`` float32 on CPU."""

    def __init__(self, net: FIDInceptionV3, device="cpu"):
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    @classmethod
    def from_file(cls, path: str | Path, device="cpu") -> "FIDInception":
        with torch.device("meta"):  # no random init of 24 M parameters that are overwritten anyway
            net = FIDInceptionV3()
        sd = load_inception_state_dict(path, net)
        # keys a file may lack (old torch's num_batches_tracked, a conversion without fc) get zeros
        full = {k: sd[k] if k in sd else torch.zeros(v.shape, dtype=v.dtype) for k, v in net.state_dict().items()}
        net.load_state_dict(full, assign=True)
        return cls(net, device)

    from_pretrained = from_file

    @torch.no_grad()
    def features_01(self, x01: Tensor, batch_size: int = 50) -> Tensor:
        """Images already in [0, 1] (any size, resized here) -> (N, 2048)."""
        out = []
        with network_call("FID Inception", self.net, x01):
            for i in range(0, x01.shape[0], batch_size):
                x = resize_299(x01[i:i + batch_size].to(self.device, torch.float32))
                out.append(self.net(2 * x - 1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 50) -> Tensor:
        """Generated images (N, 3, H, W) in [-1, 1] -> (N, 2048), quantised to 8 bits first."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FlashDMDError(f"FID features need images (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        return self.features_01(quantize(images), batch_size)


def load_inception_state_dict(path: str | Path, net: FIDInceptionV3 | None = None) -> dict[str, Tensor]:
    """Read and check a FID Inception weight file (.pth/.pt weights-only, or .safetensors); one-line errors."""
    p = Path(path).expanduser()
    hint = f"download {FID_WEIGHTS_NAME} from pytorch-fid's GitHub release 'fid_weights'"
    if not p.is_file():
        raise FlashDMDError(f"FID Inception weights {p} not found ({hint})")
    try:
        if p.suffix == ".safetensors":
            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling / format errors of many types; one line to the user
        raise FlashDMDError(f"FID Inception weights {p} are not a weights-only torch state_dict or safetensors "
                            f"file ({type(e).__name__}); {hint}") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise FlashDMDError(f"FID Inception weights {p} hold no state_dict of tensors ({hint})")
    net = net or FIDInceptionV3()
    expected = net.state_dict()
    unexpected = sorted(set(sd) - set(expected))
    # num_batches_tracked is absent from files saved by old torch; fc is unused and may be dropped in a conversion
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith("num_batches_tracked")
                     and not k.startswith("fc."))
    if unexpected or missing:
        bad = (unexpected or missing)[0]
        raise FlashDMDError(f"FID Inception weights {p} do not match pytorch-fid's FID Inception-v3 "
                            f"({len(missing)} keys missing, {len(unexpected)} unexpected, e.g. {bad!r}); {hint}")
    wrong = [k for k in sd if sd[k].shape != expected[k].shape]
    if wrong:
        raise FlashDMDError(f"FID Inception weights {p}: {wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, "
                            f"expected {tuple(expected[wrong[0]].shape)}; {hint}")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# Reference statistics


def image_files(folder: str | Path) -> list[Path]:
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise FlashDMDError(f"image folder {d} not found")
    files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in f.relative_to(d).parts))
    if not files:
        raise FlashDMDError(f"image folder {d} holds no images ({', '.join(IMAGE_EXTS)})")
    return files


def iter_image_batches(files: list[Path], batch_size: int = 50) -> Iterator[Tensor]:
    """(B, 3, 299, 299) in [0, 1]: each image RGB, /255, resized to 299 on its own (as pytorch-fid does)."""
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError):
                raise FlashDMDError(f"image {f} cannot be read as an image") from None
            batch.append(resize_299(torch.from_numpy(arr).permute(2, 0, 1)[None])[0])
        yield torch.stack(batch)


def folder_features(inception: FIDInception, folder: str | Path, batch_size: int = 50, progress=None) -> Tensor:
    feats = []
    for x in iter_image_batches(image_files(folder), batch_size):
        feats.append(inception.features_01(x, batch_size))
        if progress is not None:
            progress.update(x.shape[0])
    return torch.cat(feats)


def save_stats(path: str | Path, mu: Tensor, sigma: Tensor, num_images: int) -> Path:
    """``.safetensors`` (mu, sigma float64 + metadata) or ``.npz`` (pytorch-fid's format)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FlashDMDError(f"folder {p.parent} for the statistics does not exist")
    if p.suffix == ".npz":
        io.atomic_write(p, lambda fh: np.savez_compressed(fh, mu=mu.double().numpy(), sigma=sigma.double().numpy()),
                        "the FID statistics")
    elif p.suffix == ".safetensors":
        stats = {"mu": mu.double().contiguous(), "sigma": sigma.double().contiguous()}
        meta = {"num_images": str(num_images), "features": "pytorch-fid inception pool3 2048"}
        io.atomic_save(p, lambda tmp: save_file(stats, str(tmp), metadata=meta), "the FID statistics")
    else:
        raise FlashDMDError(f"statistics file {p} must end in .safetensors or .npz")
    return p


def load_stats(path: str | Path) -> tuple[Tensor, Tensor]:
    """(mu (D,), sigma (D, D)) float64 from .npz (pytorch-fid) or .safetensors; one-line errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FlashDMDError(f"FID reference statistics {p} not found")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                mu, sigma = torch.from_numpy(z["mu"].copy()), torch.from_numpy(z["sigma"].copy())
        elif p.suffix == ".safetensors":
            t = load_file(str(p))
            mu, sigma = t["mu"], t["sigma"]
        else:
            raise FlashDMDError(f"FID reference {p} must be a folder of images, a .npz or a .safetensors file")
    except FlashDMDError:
        raise
    except Exception as e:  # noqa: BLE001 -- format / key errors of many kinds
        raise FlashDMDError(f"FID reference statistics {p} are unreadable or lack mu/sigma ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    mu, sigma = mu.double().reshape(-1), sigma.double()
    if sigma.shape != (mu.numel(), mu.numel()):
        raise FlashDMDError(f"FID reference statistics {p}: sigma is {tuple(sigma.shape)}, mu {tuple(mu.shape)}")
    return mu, sigma


def reference_stats(ref: str | Path, inception: FIDInception | None = None, batch_size: int = 50,
                    progress=None) -> tuple[Tensor, Tensor]:
    """A folder of images (needs ``inception``) or a statistics file -> (mu, sigma)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if inception is None:
            raise FlashDMDError("reference statistics from an image folder need the FID Inception weights")
        return feature_stats(folder_features(inception, p, batch_size, progress))
    return load_stats(p)
