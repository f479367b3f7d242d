"""Gram-Frobenius distance: ‖X̃X̃ᵀ − ỸỸᵀ‖_F (``gram_frobenius``) or its square (``gram_frobenius[squared]``).

A function of second moments: ‖X̃X̃ᵀ − ỸỸᵀ‖²_F = ‖X̃ᵀX̃‖²_F + ‖ỸᵀỸ‖²_F − 2‖X̃ᵀỸ‖²_F (no n × n matrix).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.linalg import clamp_rounding, dual_is_cheaper, eps, refine_below, safe_sqrt
from repsim.measures.registry import SHAPE_INVARIANCES, Family, MetricSpec, PairMoments, register

#: accuracy (absolute) of the moments' squared distance beyond which a value outside [0, 2] is a breakdown
MOMENTS_ACCURACY = 1e-9


def qr_squared(Xr: torch.Tensor, Yr: torch.Tensor) -> torch.Tensor:
    """‖X̃X̃ᵀ − ỸỸᵀ‖²_F from Z = [X̃, Ỹ] = QR as ‖R₁R₁ᵀ − R₂R₂ᵀ‖²_F (R₁, R₂ the column blocks of R): a difference of
    matrices whose entries carry only ~eps absolute error, so nothing cancels for nearly identical inputs."""
    p = Xr.shape[1]
    R = torch.linalg.qr(torch.cat([Xr, Yr], dim=1), mode="r").R
    R1, R2 = R[:, :p], R[:, p:]
    return (R1 @ R1.T - R2 @ R2.T).square().sum()


def squared_from_moments(m: PairMoments) -> torch.Tensor:
    """‖X̃ᵀX̃‖² + ‖ỸᵀỸ‖² − 2‖X̃ᵀỸ‖², recomputed by :func:`qr_squared` from the rows where it has cancelled to below
    ``refine_below`` of its terms and the engine holds the rows (as a gradient-free correction where gradients
    flow, no gradient below (n·eps)²); batched over m's leading dimensions."""
    sx, sy = m.self_sq_norms()
    terms = sx + sy
    squared = terms - 2 * m.cross_sq_norm()
    low = squared.detach() < refine_below(squared) * terms.detach()
    if bool(low.any()) and m.rows_x is not None:
        exact = squared.detach().clone()
        for index in (torch.nonzero(low).tolist() if low.ndim else [[]]):
            Xr, Yr = m.pair_rows(tuple(index))
            exact[tuple(index)] = qr_squared(Xr.detach(), Yr.detach())
        # below (n·eps)² the gradient of the fast form is rounding noise against √(value): 0 there (the minimum)
        squared = torch.where(exact < (m.n * eps(exact)) ** 2, exact, squared + (exact - squared.detach()))
    tol = max(MOMENTS_ACCURACY, 100.0 * m.n * eps(squared) * float(terms.detach().max()))
    return clamp_rounding(squared, 0.0, 2.0, tol, "squared Gram-Frobenius distance",
                          resolution=None if m.rows_x is not None else eps(squared) * float(terms.detach().max()))


class GramFrobenius(Family):
    """The Gram-Frobenius family (module docstring)."""

    name = "gram_frobenius"
    grammar = "gram_frobenius or gram_frobenius[squared]"
    examples = ("gram_frobenius", "gram_frobenius[squared]")
    uses = frozenset({"cross_sq", "self_sq"})

    def plugin_biased(self, **kwargs: Any) -> bool:
        return True  # normalised Grams of unrelated layers overlap by ≈ r/n

    def spec(self, squared: bool = False) -> MetricSpec:
        return MetricSpec("gram_frobenius[squared]" if squared else "gram_frobenius", self.name,
                          {"squared": squared}, "lower", (0.0, 2.0 if squared else math.sqrt(2)), SHAPE_INVARIANCES,
                          True, "moments", f"Gram-Frobenius ‖K̃−L̃‖{'²' if squared else ''}_F (lower = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if options or flags not in ([], ["squared"]):
            raise self.error(text)
        return self.spec(bool(flags))

    def compute(self, X: torch.Tensor, Y: torch.Tensor, squared: bool = False, center: bool = True) -> torch.Tensor:
        return self.from_prepared(prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)"), squared)

    def from_prepared(self, Xt: torch.Tensor, Yt: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """The value from prepared rows X̃, Ỹ, differentiable: ‖X̃X̃ᵀ − ỸỸᵀ‖²_F itself where the n × n form is
        cheaper (no cancellation), else :meth:`finalize` on their moments."""
        if dual_is_cheaper(Xt.shape[0], Xt.shape[1], Yt.shape[1]):
            value = (Xt @ Xt.T - Yt @ Yt.T).square().sum()
            return value if squared else safe_sqrt(value)
        return self.finalize(PairMoments.from_rows(Xt, Yt), squared)

    def finalize(self, m: PairMoments, squared: bool = False, **kwargs: Any) -> torch.Tensor:
        value = squared_from_moments(m)
        return value if squared else safe_sqrt(value)


FAMILY = register(GramFrobenius())


def gram_frobenius(
    X: ArrayLike, Y: ArrayLike, squared: bool = False, center: bool = True, *, dtype: torch.dtype = torch.float64
) -> float | torch.Tensor:
    """Distance between the normalised Gram matrices: ‖X̃X̃ᵀ − ỸỸᵀ‖_F in [0, √2] (``squared=True``: its square).

    Lower is more similar; 0 iff Ỹ is an orthogonal transform of X̃ (up to zero padding). Symmetric; invariant to
    translation, isotropic scaling and orthogonal maps of either side; never exceeds 2 × the Procrustes distance.
    Computed by the cheaper form (:func:`repsim.measures.linalg.dual_is_cheaper`): n × n Gram matrices, or the
    p × p, q × q, p × q moments with a cancellation-free QR recomputation for nearly identical inputs.
    """
    Xt, Yt = as_pair(X, Y, dtype=dtype)
    return to_output(FAMILY.compute(Xt, Yt, bool(squared), center), X)
