"""The suite's tolerances, each derived from what the code guarantees.

Three kinds of comparison, three kinds of bound:

* The same computation (same ops, same shapes, same process) -> bitwise: ``torch.equal``. CPU kernels are
  deterministic for a fixed shape and thread count, so anything looser would hide a real difference.
* Two float paths that are mathematically equal (another summation order or batch size, diffusers' ops in
  another order, another CPU's vector width: AVX2 and AVX-512 kernels block their sums differently) -> round-off:
  ``factor * u * magnitude``, with u the dtype's unit round-off (below), magnitude the size of the values the
  operations handle (round-off is relative to the operands, so it is the largest of them, not each element, that
  sets the scale), and the factor counted where the bound is used: one u per rounding on the path, a sum of n terms
  up to n u (the worst case, gamma_n of Higham's *Accuracy and Stability of Numerical Algorithms*, sec. 3.1; sqrt(n)
  u typically), times the condition of the step (a division by alpha = 0.07 multiplies the error by 1/0.07).
  float64 is used where exactness is the claim: its u is 2^29 times smaller, so a wrong formula cannot hide.
* Statistics of random draws -> a few standard errors of the sample (``k_se``): a bound that fails with a stated
  small probability rather than one tuned to the seed.

``FLASHDMD_TOL_LOG=FILE`` appends each comparison's measured error / bound to FILE (a margin check across CPUs).
"""
from __future__ import annotations

import math
import os

import torch

U64 = 2.0 ** -53   # float64 unit round-off
U32 = 2.0 ** -24   # float32
U16 = 2.0 ** -11   # float16
UBF16 = 2.0 ** -8  # bfloat16


def magnitude(*tensors) -> float:
    """The largest |value| among ``tensors`` (the scale round-off is relative to)."""
    return max(float(torch.as_tensor(t).detach().abs().max()) for t in tensors)


def bound(factor: float, magnitude: float, u: float = U32) -> float:
    """factor * u * magnitude: the round-off of ``factor`` roundings of values of size ``magnitude``."""
    return factor * u * magnitude


def fp32_bound(magnitude: float, factor: float) -> float:
    return bound(factor, magnitude, U32)


def fp64_bound(magnitude: float, factor: float) -> float:
    return bound(factor, magnitude, U64)


def _log(err: float, tol: float, what: str) -> None:
    path = os.environ.get("FLASHDMD_TOL_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{err / tol if tol else float('inf'):10.3g}  err {err:.3g}  bound {tol:.3g}  {test} {what}\n")


def assert_close(got, want, *, factor: float, u: float = U32, mag: float | None = None, what: str = "") -> None:
    """|got - want| <= factor * u * mag elementwise; ``mag`` defaults to max |want|. Shapes and dtypes must
    match (torch.testing.assert_close's checks)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    mag = magnitude(want) if mag is None else float(mag)
    tol = bound(factor, mag, u)
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    _log(err, tol, what)
    note = f"(bound {factor:g} u * {mag:.3g} = {tol:.3g}{'; ' + what if what else ''})"
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=lambda m: f"{m}\n{note}")


def assert_rel_close(got, want, *, factor: float, u: float = U32, what: str = "") -> None:
    """|got - want| <= factor * u * |want| per element: for values computed one by one, each with its own
    relative round-off (a schedule's sigmas from 0.03 to 15)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    rel = float(((got.double() - want.double()).abs() / want.double().abs()).nan_to_num(0.0, float("inf")).max())
    _log(rel, factor * u, what)
    torch.testing.assert_close(got, want, rtol=factor * u, atol=0,
                               msg=lambda m: f"{m}\n(bound {factor:g} u relative{'; ' + what if what else ''})")


def network_factor(*modules) -> int:
    """The round-off factor of a float32 forward pass through ``modules`` relative to its output, for two float
    paths (another batch size, another CPU's kernels): the sum over the weight layers of their fan-in n (each a dot
    product of n terms, gamma_n = n u of its Higham scale |W| |x|). For random weights |W| |x| is ~sqrt(n) times
    |W x| and the typical error ~sqrt(n) times below gamma_n, so n u per layer relative to the output holds; summed
    over every layer (not one path: conservative where branches merge), since another batch size or CPU can change
    every layer's summation order, and normalisations keep each layer's output O(1) relative to its input, so the
    layers' errors add. Measured differences are far smaller (the log's margins): the bound is meant to hold on
    every CPU."""
    convs = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return sum(m.weight[0].numel() for mod in modules for m in mod.modules()
               if isinstance(m, convs) and getattr(m, "weight", None) is not None)


def sampling_factor(family, steps: int, guidance_scale: float = 1.0, decode: bool = True) -> int:
    """The round-off factor (network_factor) of float32 latents or images sampled by ``family`` along two float
    paths (two batchings): its text encoders once, its denoiser ``steps`` times -- with guidance, the combination
    u + w (c - u) multiplies the two predictions' errors by up to |w| + |w - 1| --, its VAE once."""
    w = float(guidance_scale)
    cfg = abs(w) + abs(w - 1) if w != 1.0 else 1.0
    return (network_factor(*family.text_encoders) + int(steps * cfg * network_factor(family.denoiser))
            + (network_factor(family.vae) if decode else 0))


def fd_roundoff(cov) -> float:
    """What float64 round-off can add to flashdmd's frechet_distance(mu, cov, mu', cov') when cov' is cov or
    near it (D x D): the square root S^1/2, the product S^1/2 S' S^1/2 and its eigenvalues are backward stable, so
    each eigenvalue lam_i^2 of the product moves by at most e = 3 D u64 lam_max^2 (three D x D steps), and its
    square root lam_i down by at most min(lam_i, e / lam_i) (a square root near 0 is clamped there, moving it by
    at most lam_i); the two traces add 4 D u64 tr S. Only downward moves raise FD, so the FD computed for equal
    statistics (exactly 0) is at most this."""
    cov = torch.as_tensor(cov).double()
    d = cov.shape[0]
    lam = torch.linalg.eigvalsh(cov)
    lam_max = float(lam.max())
    lam = lam.clamp_min(0) + d * U64 * lam_max  # eigvalsh's own error on the eigenvalues of S
    e = 3 * d * U64 * lam_max ** 2
    return float(2 * torch.minimum(lam, e / lam).sum() + 4 * d * U64 * cov.trace())


def fd_perturbation(mu1, cov1, mu2, cov2, roundoff: bool = True) -> float:
    """An upper bound on the Frechet distance between N(mu1, cov1) and N(mu2, cov2) for nearby statistics:
    |mu1 - mu2|^2 + ||cov1 - cov2||_1 (the covariance term is the squared Bures distance, at most
    ||S1^1/2 - S2^1/2||_F^2 <= ||S1 - S2||_1 by the Powers-Stormer inequality), plus, with ``roundoff``, what
    float64 round-off can add to the computed value (fd_roundoff)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t).double() for t in (mu1, mu2, cov1, cov2))
    nuclear = float(torch.linalg.eigvalsh((cov1 - cov2 + (cov1 - cov2).T) / 2).abs().sum())
    return float((mu1 - mu2).square().sum()) + nuclear + (fd_roundoff(cov1) if roundoff else 0.0)


def fd_error(cov1, cov2) -> float:
    """What float64 round-off can do to frechet_distance(., cov1, ., cov2) either way: each of the D eigenvalues of
    S1^1/2 S2 S1^1/2 moves by e = 3 D u64 |S1| |S2|, its square root by at most sqrt(e); the traces by D u64 each."""
    cov1, cov2 = (torch.as_tensor(t).double() for t in (cov1, cov2))
    d = cov1.shape[0]
    top = float(torch.linalg.eigvalsh(cov1).max()) * float(torch.linalg.eigvalsh(cov2).max())
    return 2 * d * (3 * d * U64 * abs(top)) ** 0.5 + 4 * d * U64 * float(cov1.trace() + cov2.trace())


# The issues' contract for reproducing a diffusers pipeline (its latents, an exported student's latents): within
# 1e-4, for latents of size ~1 -- relative to the largest |latent| where they are larger. Diffusers runs the same
# ops in another order, so float32 round-off is all that separates the two (~1e-6 measured).
PIPELINE_CONTRACT = 1e-4


def contract_bound(want) -> float:
    return PIPELINE_CONTRACT * max(1.0, magnitude(want))


def assert_within_contract(got, want, what: str = "") -> None:
    """|got - want| <= 1e-4 max(1, max |want|): the pipeline-reproduction contract (PIPELINE_CONTRACT)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    tol = contract_bound(want)
    _log(float((got.double() - want.double()).abs().max()), tol, what or "contract")
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=lambda m: f"{m}\n(the 1e-4 pipeline contract)")


def within(err: float, tol: float, what: str = "") -> bool:
    """err <= tol, logged (for scalar comparisons written as plain asserts)."""
    _log(float(err), float(tol), what)
    return float(err) <= float(tol)


def k_se(std: float, n: int, k: float = 5.0) -> float:
    """k standard errors of a mean of n draws of spread std; k = 5: a false failure has probability ~6e-7
    (two-sided normal tail) per assertion."""
    return k * std / math.sqrt(n)
