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


def within(err: float, tol: float, what: str = "") -> bool:
    """err <= tol, logged (for scalar comparisons written as plain asserts)."""
    _log(float(err), float(tol), what)
    return float(err) <= float(tol)


def k_se(std: float, n: int, k: float = 5.0) -> float:
    """k standard errors of a mean of n draws of spread std; k = 5: a false failure has probability ~6e-7
    (two-sided normal tail) per assertion."""
    return k * std / math.sqrt(n)
