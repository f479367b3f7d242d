"""Differentiable representational-similarity losses for distillation (torch ``nn.Module``s).

Every loss takes ``forward(teacher, student, attention_mask=None)``:

- ``teacher``: (batch, p) or (batch, tokens, p); a constant target (it is detached, no gradient flows into it).
- ``student``: (batch, q) or (batch, tokens, q), the same leading shape as ``teacher``; widths may differ.
- ``attention_mask``: optional, the leading shape of the inputs ((batch,) or (batch, tokens)); rows where it is
  0 (padding) are dropped before anything is computed, so they never touch the value or the gradient.

Token inputs are flattened to the n real token rows X (n×p, teacher) and Y (n×q, student), then the metric
conventions of :mod:`repsim.measures.functions` apply: centre the columns, divide by the Frobenius norm
(X̃ = Xc/‖Xc‖_F, Ỹ = Yc/‖Yc‖_F). The geometry losses compute in float64 by default (``compute_dtype``; float32
is allowed, e.g. on GPUs with slow float64), whatever the input dtype (bf16 hidden states included) and with
autocast switched off inside; the returned scalar is float32 (float64 when an input is float64), so it adds
cleanly to a loss computed under autocast.

| loss | value |
|---|---|
| ``ProcrustesLoss(output="distance")`` | √max(0, 2 − 2ρ), ρ = ‖X̃ᵀỸ‖_*; ``"squared"``: 2 − 2ρ; ``"angular"``: arccos ρ |
| ``GramFrobeniusLoss(squared=False)`` | ‖X̃X̃ᵀ − ỸỸᵀ‖_F (``squared=True``: its square) |
| ``CKALoss(estimator="biased")`` | 1 − linear CKA (``"debiased"``: Song et al.'s U-statistic HSIC, needs n ≥ 4) |
| ``ProjectionLoss(p_teacher, q_student)`` | mean((Linear(Y) − X)²) with a learned unrestricted linear map (FitNets) |

Gradient safety:
- The nuclear norm's gradient is the polar factor d‖M‖_*/dM = U_r V_rᵀ, taken over the singular values above
  the rank tolerance only. It comes from one SVD in the forward pass (on CUDA by default from ``eigh`` of the
  small Gram matrix, faster there than cuSOLVER's SVD: benchmarks/RESULTS.md) and never differentiates U or V, so
  repeated singular values (e.g. a rotated copy) and zero ones (n < width, a zero cross-product block) give finite
  gradients. Where ‖·‖_* has a kink (rank-deficient M) U_r V_rᵀ is the minimum-norm subgradient, which is
  exactly what a central finite difference measures, so ``torch.autograd.gradcheck`` passes there too.
- √ and arccos have infinite slope where the distance is 0 (identical geometry, the minimum): there the
  gradient is defined as 0, a valid subgradient at a minimum. Away from 0 it is the exact derivative.
  The ``squared`` forms are smooth everywhere; prefer them when you want a gradient that shrinks near the optimum.
- Too few rows (n < 2; n < 4 for the debiased estimator), zero variance and NaN/inf inputs raise
  :class:`repsim.system.errors.UserError` with one line naming the problem, never a NaN loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from repsim.measures.arrays import centred_unit
from repsim.measures.linalg import NUCLEAR_METHODS, nuclear_norm
from repsim.measures.registry import PairMoments, families, get_metric
from repsim.system.errors import UserError

__all__ = [
    "CKALoss",
    "FEATURE_LOSSES",
    "GramFrobeniusLoss",
    "NUCLEAR_METHODS",
    "ProcrustesLoss",
    "ProjectionLoss",
    "make_feature_loss",
    "nuclear_norm",
]

FEATURE_LOSSES = ("projection", "cka", "procrustes", "gram_frobenius")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# input handling


def _flatten_rows(
    teacher: torch.Tensor, student: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch[, tokens], width) pair + optional mask → the real rows, (n, p) and (n, q); the teacher detached."""
    if not isinstance(teacher, torch.Tensor) or not isinstance(student, torch.Tensor):
        raise UserError(
            f"teacher and student must be torch tensors, got {type(teacher).__name__} and {type(student).__name__}"
        )
    if teacher.ndim not in (2, 3) or student.ndim not in (2, 3):
        raise UserError(
            "teacher and student must be (batch, width) or (batch, tokens, width), "
            f"got shapes {tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    if teacher.shape[:-1] != student.shape[:-1]:
        raise UserError(
            "teacher and student must have the same leading (batch[, tokens]) shape, "
            f"got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    if not teacher.is_floating_point() or not student.is_floating_point():
        raise UserError(f"teacher and student must be floating point, got {teacher.dtype} and {student.dtype}")
    if teacher.device != student.device:
        raise UserError(f"teacher and student are on different devices: {teacher.device} and {student.device}")
    teacher = teacher.detach()
    if attention_mask is None:
        return teacher.reshape(-1, teacher.shape[-1]), student.reshape(-1, student.shape[-1])
    if tuple(attention_mask.shape) != tuple(teacher.shape[:-1]):
        raise UserError(
            f"attention_mask must have shape {tuple(teacher.shape[:-1])} (the inputs' leading shape), "
            f"got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.to(device=teacher.device) != 0
    return teacher[keep], student[keep]


def _check_rows(n: int, min_rows: int, why: str = "") -> None:
    if n < min_rows:
        raise UserError(f"need at least {min_rows} non-masked rows (samples or tokens){why}, got {n}")


def _compute_dtype(requested: torch.dtype, *tensors: torch.Tensor) -> torch.dtype:
    """float64 when requested or when an input already is float64, else float32."""
    if requested == torch.float64 or any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _output_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The loss's dtype: float64 for float64 inputs, float32 otherwise (also for bf16/fp16 inputs under autocast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Switch autocast off for the loss's own arithmetic (it must not be cast down to bf16/fp16)."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to switch off
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _centered_unit(
    teacher: torch.Tensor, student: torch.Tensor, dtype: torch.dtype, min_rows: int = 2, why: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """X̃ = Xc/‖Xc‖_F and Ỹ = Yc/‖Yc‖_F in ``dtype`` (columns centred), with one check for bad input."""
    _check_rows(teacher.shape[0], min_rows, why)
    out = []
    for name, t in (("teacher", teacher), ("student", student)):
        out.append(centred_unit(t.to(dtype), f"{name} features (over the {t.shape[0]} non-masked rows)",
                                what="the loss"))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# gradient-safe elementary functions


# ---------------------------------------------------------------------------------------------------------------
# the losses: each metric loss is its family's value (repsim.measures.families), differentiable

_PROCRUSTES = families()["procrustes"]
_GRAM_FROBENIUS = families()["gram_frobenius"]
_CKA = families()["cka"]


class _GeometryLoss(nn.Module):
    """Shared input handling of the parameter-free losses (flatten, mask, dtype, autocast)."""

    min_rows = 2

    def __init__(self, compute_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if compute_dtype not in _COMPUTE_DTYPES:
            raise UserError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss (a 0-dim tensor) between the teacher's and the student's non-masked rows."""
        X, Y = _flatten_rows(teacher, student, attention_mask)
        dtype = _compute_dtype(self.compute_dtype, X, Y)
        with _no_autocast(X.device):
            value = self._loss(X, Y, dtype)
        return value.to(_output_dtype(X, Y))

    def _loss(self, X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"compute_dtype={self.compute_dtype}"


class ProcrustesLoss(_GeometryLoss):
    """Procrustes loss from ρ = ‖X̃ᵀỸ‖_* (nuclear norm of the p×q cross-product; no zero padding for p ≠ q).

    ``output="distance"`` (default): √max(0, 2 − 2ρ) = min over orthogonal Q of ‖X̃ − [Ỹ, 0]Q‖_F, in [0, √2],
    equal to ``repsim.measures.functions.procrustes(X, Y, output="distance")``; gradient 0 at distance 0.
    ``output="squared"``: 2 − 2ρ in [0, 2], smooth (no square root). ``output="angular"``: arccos(min(ρ, 1)),
    in [0, π/2] (Williams et al. 2021); gradient 0 at ρ ≥ 1.
    Invariant to translation, isotropic scaling and orthogonal maps of either side; not to general linear maps.
    ``method``: how ‖·‖_* and its gradient are computed: "svd" (thin SVD of the p×q matrix), "gram" (eigh of the
    min(p,q)-sized Gram matrix, faster on GPUs: benchmarks/RESULTS.md) or "auto" (gram on CUDA, svd elsewhere);
    they agree to ~1e-12.
    Cost: one n×p×q matrix product and one p×q SVD (or Gram eigh) forward, one n×p×q product backward.
    """

    OUTPUTS = ("distance", "squared", "angular")

    def __init__(
        self, output: str = "distance", compute_dtype: torch.dtype = torch.float64, method: str = "auto"
    ) -> None:
        super().__init__(compute_dtype)
        if output not in self.OUTPUTS:
            raise UserError(f"ProcrustesLoss output must be one of {', '.join(self.OUTPUTS)}, got {output!r}")
        if method not in NUCLEAR_METHODS:
            raise UserError(f"ProcrustesLoss method must be one of {', '.join(NUCLEAR_METHODS)}, got {method!r}")
        self.output = output
        self.method = method

    def _loss(self, X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        Xt, Yt = _centered_unit(X, Y, dtype, self.min_rows)
        # unit-norm inputs: entries of X̃ᵀỸ carry rounding error of at most ~n·eps, so σ below that are noise
        rho = nuclear_norm(Xt.T @ Yt, atol=max(*Xt.shape, Yt.shape[1]) * torch.finfo(dtype).eps, method=self.method)
        return _PROCRUSTES.finalize(PairMoments.from_rows(Xt, Yt, nuclear=rho), output=self.output)

    def extra_repr(self) -> str:
        return f"output={self.output!r}, method={self.method!r}, {super().extra_repr()}"


class GramFrobeniusLoss(_GeometryLoss):
    """‖X̃X̃ᵀ − ỸỸᵀ‖_F, the Frobenius distance of the n×n feature Gram matrices (``squared=True``: its square).

    Never forms n×n for large n: ‖X̃X̃ᵀ − ỸỸᵀ‖²_F = ‖X̃ᵀX̃‖²_F + ‖ỸᵀỸ‖²_F − 2‖X̃ᵀỸ‖²_F with p×p, q×q and p×q
    products, unless n(p + q) < p² + q² + pq, where the n×n form is cheaper (and has no cancellation).
    In [0, √2]; equal to ``repsim.measures.functions.gram_frobenius``; gradient 0 at distance 0 (``squared=False``).
    """

    def __init__(self, squared: bool = False, compute_dtype: torch.dtype = torch.float64) -> None:
        super().__init__(compute_dtype)
        self.squared = bool(squared)

    def _loss(self, X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        Xt, Yt = _centered_unit(X, Y, dtype, self.min_rows)
        return _GRAM_FROBENIUS.from_prepared(Xt, Yt, self.squared)

    def extra_repr(self) -> str:
        return f"squared={self.squared}, {super().extra_repr()}"


class CKALoss(_GeometryLoss):
    """1 − linear CKA: 1 − HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)), K = X̃X̃ᵀ, L = ỸỸᵀ (Kornblith et al. 2019).

    ``estimator="biased"`` (default): ⟨K, L⟩/(‖K‖_F‖L‖_F) on centred features, in [0, 1]; equal to
    1 − ``repsim.measures.functions.cka(X, Y, estimator="biased")``. ``estimator="debiased"``: Song et al.'s unbiased
    HSIC
    (Kornblith's debiased CKA); needs n ≥ 4 non-masked rows, and raises when a self-HSIC estimate is not positive
    beyond rounding (repsim.measures.arrays.check_self_hsic) rather than returning NaN. Computed with p×p, q×q, p×q
    products, or n×n ones when cheaper.
    Blind spot (the paper's Theorem 1): CKA can approach 1 (loss → 0) while the student's geometry stays far
    from the teacher's (Procrustes distance → √(2 − √2)).
    """

    ESTIMATORS = ("biased", "debiased")

    def __init__(self, estimator: str = "biased", compute_dtype: torch.dtype = torch.float64) -> None:
        super().__init__(compute_dtype)
        if estimator not in self.ESTIMATORS:
            raise UserError(f"CKALoss estimator must be one of {', '.join(self.ESTIMATORS)}, got {estimator!r}")
        self.estimator = estimator
        self.min_rows = 4 if estimator == "debiased" else 2

    def _loss(self, X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        why = " for the debiased CKA estimator (it divides by n−3)" if self.estimator == "debiased" else ""
        Xt, Yt = _centered_unit(X, Y, dtype, self.min_rows, why)
        return 1.0 - _CKA.finalize(PairMoments.from_rows(Xt, Yt), estimator=self.estimator)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, {super().extra_repr()}"


class ProjectionLoss(nn.Module):
    """The FitNets/TinyBERT baseline: mean((Y Wᵀ + b − X)²) with a learned, unrestricted ``nn.Linear`` W (q → p).

    X, Y are the raw (uncentred, unscaled) non-masked rows; the mean is over the n·p entries (``F.mse_loss``).
    Computed in the projection's parameter dtype (float32 unless the module is converted), with autocast off.
    Blind spot: when the student is any invertible linear map of the teacher (Y = XA), W = A⁻¹ makes the loss 0
    although the geometry (inner products, angles) differs; at its optimum over W, b the loss equals the in-sample
    projection residual times ‖Xc‖²_F/(n·p).
    """

    def __init__(self, teacher_dim: int, student_dim: int, bias: bool = True) -> None:
        super().__init__()
        if teacher_dim < 1 or student_dim < 1:
            raise UserError(f"teacher_dim and student_dim must be positive, got {teacher_dim} and {student_dim}")
        self.teacher_dim = int(teacher_dim)
        self.student_dim = int(student_dim)
        self.proj = nn.Linear(self.student_dim, self.teacher_dim, bias=bias)

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MSE between Linear(student) and the teacher over the non-masked rows (a 0-dim tensor)."""
        X, Y = _flatten_rows(teacher, student, attention_mask)
        if X.shape[1] != self.teacher_dim or Y.shape[1] != self.student_dim:
            raise UserError(
                f"ProjectionLoss was built for teacher width {self.teacher_dim} and student width "
                f"{self.student_dim}, got {X.shape[1]} and {Y.shape[1]}"
            )
        _check_rows(X.shape[0], 1)
        dtype = self.proj.weight.dtype
        with _no_autocast(X.device):
            return nn.functional.mse_loss(self.proj(Y.to(dtype)), X.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# factory

#: the registered family of each feature loss that is a metric (the loss is its value, 1 − it for CKA)
_LOSSES = {"procrustes": lambda kw: ProcrustesLoss(output=kw["output"]),
           "gram_frobenius": lambda kw: GramFrobeniusLoss(squared=kw["squared"]),
           "cka": lambda kw: CKALoss(estimator=kw["estimator"])}


def make_feature_loss(name: str, teacher_dim: int, student_dim: int) -> nn.Module:
    """The distillation feature loss called ``name``, for teacher width ``teacher_dim`` and student ``student_dim``.

    ``name`` is "projection" (the learned linear map, FitNets) or a metric id of the procrustes, gram_frobenius or
    linear cka family as :func:`repsim.measures.registry.get_metric` parses it (defaults: Procrustes distance,
    Gram-Frobenius distance, 1 − biased linear CKA): "procrustes[squared]", "procrustes[angular]",
    "gram_frobenius[squared]", "cka[debiased]", "cka[linear,debiased]". Only "projection" has parameters.
    """
    if not isinstance(name, str):
        raise UserError(f"unknown feature loss {name!r}; choose one of {', '.join(FEATURE_LOSSES)}")
    compact = "".join(name.split()).lower()
    if compact == "projection":
        return ProjectionLoss(teacher_dim, student_dim)
    if compact.split("[", 1)[0] not in _LOSSES:
        raise UserError(f"unknown feature loss {name!r}; choose one of {', '.join(FEATURE_LOSSES)}")
    try:
        spec = get_metric(compact)
    except UserError as exc:
        raise UserError(f"unknown options in feature loss {name!r} ({exc})") from None
    if not spec.linear:
        raise UserError(f"unknown options in feature loss {name!r}: {spec.id} is not a differentiable loss")
    return _LOSSES[spec.family](dict(spec.kwargs))
