"""SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017): ``svcca[k=K]`` and ``svcca[var=V]``.

Each side is first reduced to its top principal directions (of the centred, unit-Frobenius side: the eigenvectors
of C_xx with the largest eigenvalues): the K largest (at most the rank), or the fewest whose eigenvalues (squared
singular values, i.e. variance) sum to at least V of the total (``var=0.99`` as in the paper). The value is the
mean of the min(K_x, K_y) canonical correlations of the two reduced sides (:mod:`repsim.measures.families.cca`),
in [0, 1], higher = more similar. The reduction makes it invariant to translation, isotropic scaling, orthogonal
maps and permutations, not to general invertible maps (they change the principal directions).

As google/svcca's tutorial recipe (SVD of each centred side, keep s[:K]·V[:K], CCA, np.mean of the coefficients),
on the same K. When K_x + K_y ≥ n the reduced sides are degenerate (canonical correlations of 1 by construction)
and every engine refuses, where the tutorial recipe returns a number.
"""

from __future__ import annotations

from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.families.cca import (
    basis_rank,
    canonical_correlations,
    check_not_degenerate,
    first_k,
    whitening_basis,
)
from repsim.measures.registry import (
    SHAPE_INVARIANCES,
    Family,
    MetricSpec,
    PairMoments,
    finalize_by_teacher_layer,
    layer_rows_only,
    register,
)

FIXES = "choose a smaller K (svcca[k=K] with 2K < n) or a lower variance fraction, or use more samples"


class SVCCA(Family):
    """SVCCA (module docstring)."""

    name = "svcca"
    grammar = "svcca[k=K] (K ≥ 1 principal directions per side) or svcca[var=V] (0 < V ≤ 1 of the variance)"
    examples = ("svcca[k=10]", "svcca[var=0.99]")

    def spec(self, k: int | None = None, var: float | None = None) -> MetricSpec:
        """The spec of one convention."""
        cid, what = (f"svcca[k={k}]", f"top {k} directions") if k is not None else \
            (f"svcca[var={var:g}]", f"directions holding {var:g} of the variance")
        return MetricSpec(cid, self.name, {"k": k, "var": var}, "higher", (0.0, 1.0), SHAPE_INVARIANCES, True,
                          "moments", f"SVCCA mean canonical correlation, {what} (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or len(options) != 1 or set(options) - {"k", "var"}:
            raise self.error(text)
        if "k" in options:
            return self.spec(k=self.integer(options, "k", None, text, 1))
        var = self.number(options, "var", 0.99, text)
        if not 0 < var <= 1:
            raise self.error(text, f"var must lie in (0, 1], got {options['var']!r}")
        return self.spec(var=var)

    def min_rows(self, **kwargs: Any) -> int:
        return 3

    def compute(self, X: torch.Tensor, Y: torch.Tensor, k: int | None = None, var: float | None = None,
                center: bool = True) -> torch.Tensor:
        Xt, Yt = prepare(X, center, "X (teacher)"), prepare(Y, center, "Y (student)")
        return self.finalize(PairMoments.from_rows(Xt, Yt), k, var)

    def layer_statistics(self, cov: torch.Tensor, n: int, k: int | None = None, var: float | None = None,
                         **kwargs: Any) -> Any:
        """The whitening basis of the layer's top principal directions."""
        return whitening_basis(cov, top=k, variance=var)

    def finalize(self, m: PairMoments, k: int | None = None, var: float | None = None, **kwargs: Any) -> torch.Tensor:
        if layer_rows_only(m):
            return finalize_by_teacher_layer(self, m, k=k, var=var)
        Bx = m.state_x if m.state_x is not None else whitening_basis(m.cov_x, top=k, variance=var)
        By = m.state_y if m.state_y is not None else whitening_basis(m.cov_y, top=k, variance=var)
        name = f"svcca[k={k}]" if k is not None else f"svcca[var={var:g}]"
        check_not_degenerate(m.n, basis_rank(Bx), basis_rank(By), name, FIXES, "principal directions kept")
        rho, count = canonical_correlations(m, Bx, By)
        return (rho * first_k(rho, count)).sum(dim=-1) / count.to(rho.dtype)


FAMILY = register(SVCCA())


def svcca(X: ArrayLike, Y: ArrayLike, k: int | None = None, var: float | None = None,
          center: bool = True) -> float | torch.Tensor:
    """SVCCA of teacher ``X`` (n × p) and student ``Y`` (n × q) with ``k`` directions or a ``var`` fraction of the
    variance per side (module docstring); higher is more similar."""
    options = {"k": str(k)} if k is not None else {"var": str(var if var is not None else 0.99)}
    spec = FAMILY.parse([], options, f"svcca[{next(iter(options))}={next(iter(options.values()))}]")
    Xt, Yt = as_pair(X, Y, min_rows=3)
    return to_output(FAMILY.compute(Xt, Yt, center=center, **spec.kwargs), X)
