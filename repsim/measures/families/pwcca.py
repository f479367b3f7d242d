"""Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018): ``pwcca``.

With the canonical correlations ρᵢ of the centred, unit-Frobenius sides (:mod:`repsim.measures.families.cca`,
i = 1 … k = min(r_x, r_y)) and hᵢ = X̃aᵢ the teacher's unit-norm canonical variates, each correlation is weighted
by how much of the teacher's neurons its variate accounts for, αᵢ = Σⱼ |⟨hᵢ, x̃ⱼ⟩| over the teacher's columns
x̃ⱼ, and PWCCA = Σᵢ αᵢρᵢ / Σᵢ αᵢ, in [0, 1], higher = more similar. From moments: aᵢ = Bₓuᵢ (uᵢ the left singular
vectors of BₓᵀC_xyB_y) and ⟨hᵢ, x̃ⱼ⟩ = (C_xx aᵢ)ⱼ.

Asymmetric (the teacher's neurons weigh). Invariant to translation, isotropic scaling and permutations of either
side, and to any invertible linear map of the student (the canonical variates depend on its column space only);
an orthogonal map of the teacher changes its neurons and so the weights. Degenerate samples (r_x + r_y ≥ n) are
refused as for CCA.

Against google/svcca's ``compute_pwcca`` (docs/measures.md): it forms the "canonical directions" from the
unwhitened coefficients (missing C_xx^{-1/2}), so its weights are not those of the canonical variates (values
differ by 0.3–2.3 % on the reference inputs), it weighs whichever side has fewer neurons, and it fails with an
IndexError when the first argument is the wider one.
"""

from __future__ import annotations

from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.families.cca import basis_rank, check_not_degenerate, compact, first_k, whitening_basis
from repsim.measures.linalg import clamp_rounding
from repsim.measures.registry import (
    Family,
    MetricSpec,
    PairMoments,
    finalize_by_teacher_layer,
    layer_rows_only,
    register,
)
from repsim.system.errors import UserError

FIXES = "use cca[mean_r,ridge=0.1] (regularised CCA) or svcca[k=K] with 2K < n, or more samples"


class PWCCA(Family):
    """Projection-weighted CCA (module docstring)."""

    name = "pwcca"
    grammar = "pwcca"
    examples = ("pwcca",)

    def spec(self) -> MetricSpec:
        """The spec."""
        return MetricSpec("pwcca", self.name, {}, "higher", (0.0, 1.0),
                          frozenset({"translation", "isotropic_scale", "permutation"}), False, "moments",
                          "projection-weighted CCA, teacher-weighted (higher = more similar)",
                          frozenset({"orthogonal", "invertible_linear"}))

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or options:
            raise self.error(text)
        return self.spec()

    def min_rows(self, **kwargs: Any) -> int:
        return 3

    def compute(self, X: torch.Tensor, Y: torch.Tensor, center: bool = True) -> torch.Tensor:
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        return self.finalize(PairMoments.from_rows(Xt, Yt))

    def layer_statistics(self, cov: torch.Tensor, n: int, **kwargs: Any) -> Any:
        """The layer's whitening basis (:func:`~repsim.measures.families.cca.whitening_basis`)."""
        return whitening_basis(cov)

    def finalize(self, m: PairMoments, **kwargs: Any) -> torch.Tensor:
        if layer_rows_only(m):
            return finalize_by_teacher_layer(self, m)
        Bx = m.state_x if m.state_x is not None else whitening_basis(m.cov_x)
        By = m.state_y if m.state_y is not None else whitening_basis(m.cov_y)
        check_not_degenerate(m.n, basis_rank(Bx), basis_rank(By), "pwcca", FIXES)
        if m.rows_x is not None and not isinstance(m.rows_x, torch.Tensor) and any(r.shape[1] >= m.n for r in m.rows_x):
            # an engine's rows of a teacher at least as wide as n are a rotated n-column factor: no neurons to weigh
            raise UserError(f"pwcca weighs the teacher's neurons, which this engine holds rotated when the teacher is "
                            f"at least as wide as the {m.n} samples: compute it in memory "
                            "(repsim.measures.families.pwcca.pwcca)")
        Bx, By = compact(Bx), compact(By)
        U, rho, _ = torch.linalg.svd((Bx.mT @ m.cross) @ By, full_matrices=False)
        rho = clamp_rounding(rho, 0.0, 1.0, 1e-9, "a canonical correlation")
        k = torch.minimum(basis_rank(Bx), basis_rank(By))
        weights = (m.cov_x @ Bx @ U).abs().sum(dim=-2) * first_k(rho, k)
        return (weights * rho).sum(dim=-1) / weights.sum(dim=-1)


FAMILY = register(PWCCA())


def pwcca(X: ArrayLike, Y: ArrayLike, center: bool = True) -> float | torch.Tensor:
    """Projection-weighted CCA of teacher ``X`` (n × p) and student ``Y`` (n × q), weighted by the teacher's
    neurons (module docstring); higher is more similar."""
    Xt, Yt = as_pair(X, Y, min_rows=3)
    return to_output(FAMILY.compute(Xt, Yt, center=center), X)
