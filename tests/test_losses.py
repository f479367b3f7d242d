"""Facts about repsim.measures.losses: values equal the metric definitions, gradients are exact (float64 gradcheck)
also on
degenerate inputs, masks are honoured, the losses train, and the projection loss has the blind spot the geometry
losses do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slow_formulas import (
    slow_gram_frobenius,
    slow_linear_cka,
    slow_procrustes_distance,
    slow_projection_residual,
    slow_unbiased_hsic,
)

from repsim.measures.losses import (
    CKALoss,
    GramFrobeniusLoss,
    ProcrustesLoss,
    ProjectionLoss,
    make_feature_loss,
    nuclear_norm,
)
from repsim.system.errors import UserError

DT = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# slow formulas written from the definitions (explicit n×n matrices, explicit minimisation over Q) live in
# tests/slow_formulas.py; slow_value picks the one a loss name stands for


def slow_value(loss_name: str, X: np.ndarray, Y: np.ndarray) -> float:
    """The loss `loss_name` from the shared slow formulas (1 − CKA for the CKA losses)."""
    d = slow_procrustes_distance(X, Y)
    return {
        "procrustes[distance]": d,
        "procrustes[squared]": d * d,
        "procrustes[angular]": math.acos(min(1.0, max(0.0, 1.0 - d * d / 2))),
        "gram_frobenius": slow_gram_frobenius(X, Y),
        "gram_frobenius[squared]": slow_gram_frobenius(X, Y) ** 2,
        "cka": 1.0 - slow_linear_cka(X, Y),
        "cka[debiased]": 1.0 - slow_linear_cka(X, Y, slow_unbiased_hsic, center=True),
    }[loss_name]


GEOMETRY = ["procrustes[distance]", "procrustes[squared]", "procrustes[angular]", "gram_frobenius",
            "gram_frobenius[squared]", "cka", "cka[debiased]"]
SMOOTH_AT_MINIMUM = ["procrustes[squared]", "gram_frobenius[squared]", "cka", "cka[debiased]"]
KINKED_AT_MINIMUM = ["procrustes[distance]", "procrustes[angular]", "gram_frobenius"]


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def _orthogonal(seed: int, k: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(_rand(seed, k, k))
    return Q


def _centered_orthonormal(seed: int, n: int, k: int) -> torch.Tensor:
    """n×k with orthonormal, zero-mean columns."""
    A = _rand(seed, n, k)
    Q, _ = torch.linalg.qr(A - A.mean(0))
    return Q


# ---------------------------------------------------------------------------------------------------------------
# values


def test_published_reference_values():
    """Kornblith's demo data (docs/measures.md §5): linear CKA, debiased CKA, Procrustes ρ, angular, squared."""
    rng = np.random.RandomState(1337)
    X = rng.randn(100, 10)
    Y = rng.randn(100, 10) + X
    X, Y = torch.from_numpy(X), torch.from_numpy(Y)
    assert 1 - CKALoss()(X, Y).item() == pytest.approx(0.5576132566, abs=1e-10)
    assert 1 - CKALoss("debiased")(X, Y).item() == pytest.approx(0.5134564895, abs=1e-10)
    assert ProcrustesLoss("squared")(X, Y).item() == pytest.approx(0.5274893788, abs=1e-10)
    assert 1 - ProcrustesLoss("squared")(X, Y).item() / 2 == pytest.approx(0.7362553106, abs=1e-10)
    assert ProcrustesLoss("angular")(X, Y).item() == pytest.approx(0.7432764761, abs=1e-10)
    assert ProcrustesLoss("distance")(X, Y).item() == pytest.approx(0.7262846403, abs=1e-10)
    assert GramFrobeniusLoss()(X, Y).item() == pytest.approx(0.3129930176, abs=1e-10)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(5, 40), p=st.integers(1, 12), q=st.integers(1, 12), seed=st.integers(0, 2**16),
       loss_name=st.sampled_from(GEOMETRY))
def test_values_equal_slow_formulas(n, p, q, seed, loss_name):
    """All shapes, n < width and n > width, p ≠ q: the loss is the definition, to 1e-8."""
    X = np.random.default_rng(seed).standard_normal((n, p))
    Y = np.random.default_rng(seed + 1).standard_normal((n, q)) + 0.5 * X[:, :1]
    loss = make_feature_loss(loss_name, p, q)
    got = loss(torch.from_numpy(X), torch.from_numpy(Y)).item()
    assert got == pytest.approx(slow_value(loss_name, X, Y), rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_near_identical_inputs_absolute_accuracy(method):
    """docs/pitfalls.md, item 8: the p×q forms compute 2 − 2ρ and ‖·‖² differences, whose rounding (~1e-16) the √
    turns into an absolute error of ~1e-9; the relative error grows like eps/δ² as Y = X + δ·E approaches X."""
    X = _rand(200, 500, 20)
    for delta in (1e-3, 1e-4, 1e-5, 1e-6):
        Y = X + delta * _rand(201, 500, 20)
        exact_procrustes = slow_procrustes_distance(X.numpy(), Y.numpy())  # explicit residual: no cancellation
        exact_gram = slow_gram_frobenius(X.numpy(), Y.numpy())
        got_procrustes = ProcrustesLoss(method=method)(X, Y).item()
        got_gram = GramFrobeniusLoss()(X, Y).item()
        assert got_procrustes == pytest.approx(exact_procrustes, abs=1e-8, rel=1e-6 if delta >= 1e-4 else 1e-2)
        assert got_gram == pytest.approx(exact_gram, abs=1e-8, rel=1e-6 if delta >= 1e-4 else 1e-2)


@pytest.mark.parametrize("n,p,q", [(6, 40, 30), (300, 20, 10)])
def test_gram_frobenius_both_forms_agree(n, p, q):
    """The n×n form (small n) and the p×q form (large n) are chosen by shape and give the same number."""
    X, Y = _rand(0, n, p), _rand(1, n, q)
    assert GramFrobeniusLoss()(X, Y).item() == pytest.approx(
        slow_gram_frobenius(X.numpy(), Y.numpy()), rel=1e-10, abs=1e-10)
    assert 1 - CKALoss()(X, Y).item() == pytest.approx(slow_linear_cka(X.numpy(), Y.numpy()), rel=1e-10, abs=1e-10)


METRIC_CALLS = {
    "procrustes[distance]": ("procrustes", {"output": "distance"}, lambda v: v),
    "procrustes[squared]": ("procrustes", {"output": "squared"}, lambda v: v),
    "procrustes[angular]": ("procrustes", {"output": "angular"}, lambda v: v),
    "gram_frobenius": ("gram_frobenius", {}, lambda v: v),
    "gram_frobenius[squared]": ("gram_frobenius", {"squared": True}, lambda v: v),
    "cka": ("cka", {}, lambda v: 1 - v),
    "cka[debiased]": ("cka", {"estimator": "debiased"}, lambda v: 1 - v),
}


@pytest.mark.parametrize("loss_name", GEOMETRY)
@pytest.mark.parametrize("n,p,q", [(50, 12, 7), (9, 16, 20)])
def test_values_equal_repsim_metrics(loss_name, n, p, q):
    """The loss is the value `repsim.measures.functions` reports (1 − CKA for the CKA loss)."""
    metrics = pytest.importorskip("repsim.measures.functions")
    X, Y = _rand(2, n, p), _rand(3, n, q) + _rand(2, n, p)[:, :1]
    func, kwargs, to_loss = METRIC_CALLS[loss_name]
    expected = to_loss(float(getattr(metrics, func)(X.numpy(), Y.numpy(), **kwargs)))
    assert make_feature_loss(loss_name, p, q)(X, Y).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# gradients


def _gradcheck(loss: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, eps: float = 1e-6) -> bool:
    Y = Y.clone().requires_grad_(True)
    return torch.autograd.gradcheck(lambda y: loss(X, y), (Y,), eps=eps, atol=eps, rtol=1e-4)


def _degenerate_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    n = 10
    Q = _centered_orthonormal(7, n, 6)
    R = _orthogonal(8, 4)
    X = _rand(9, n, 5)
    return {
        # n < width on both sides: X̃ᵀỸ has rank ≤ n − 1 < min(p, q), so zero singular values
        "n_below_width": (_rand(10, 6, 9), _rand(11, 6, 8)),
        # X̃ᵀỸ is a 2×2 orthogonal block padded with zeros: singular values (¼, ¼, 0, 0) repeated and zero
        "repeated_and_zero_sigma": (Q[:, :4], Q[:, [0, 1, 4, 5]] @ R),
        # X̃ᵀỸ = 0 (student orthogonal to teacher): all singular values 0
        "zero_cross_product": (Q[:, :3], Q[:, 3:6]),
        # a rank-1 cross-product with wider inputs (one shared direction)
        "rank_one_cross_product": (torch.cat([Q[:, :1], Q[:, 1:3]], 1), torch.cat([Q[:, :1], Q[:, 3:6]], 1)),
        # p ≠ q and different feature counts, generic
        "generic": (X, _rand(12, n, 3) + X[:, :3]),
    }


@pytest.mark.parametrize("case", list(_degenerate_pairs()))
@pytest.mark.parametrize("loss_name", GEOMETRY)
def test_gradcheck_degenerate_inputs(loss_name, case):
    """float64 gradcheck passes on rank-deficient, zero and repeated-σ cross-products (distance > 0 here)."""
    X, Y = _degenerate_pairs()[case]
    loss = make_feature_loss(loss_name, X.shape[1], Y.shape[1])
    assert _gradcheck(loss, X, Y)


@pytest.mark.parametrize("case", list(_degenerate_pairs()) + ["identical", "rotated_copy", "wide_teacher"])
@pytest.mark.parametrize("output", ["distance", "squared"])
def test_gram_and_svd_nuclear_norms_agree(output, case):
    """The eigh-of-Gram method (the CUDA default) gives the SVD method's value and gradient, and passes gradcheck,
    also on zero, repeated and rank-deficient cross-products. (Its small σ carry rounding error ~eps·σ_max²/σ,
    ~1e-11 at σ ~ 1e-6, so the finite differences at exactly degenerate points use a step of 1e-5.)"""
    pairs = _degenerate_pairs()
    X = _rand(190, 12, 5)
    pairs["identical"] = (X, X.clone())
    pairs["rotated_copy"] = (X, X @ _orthogonal(191, 5))
    pairs["wide_teacher"] = (_rand(192, 16, 3), _rand(193, 16, 7))  # p < q: the Gram of the other side
    X, Y = pairs[case]
    results = []
    for method in ("svd", "gram"):
        y = Y.clone().requires_grad_(True)
        value = ProcrustesLoss(output, method=method)(X, y)
        value.backward()
        results.append((value.item(), y.grad))
    at_zero_distance = output == "distance" and case in ("identical", "rotated_copy")
    # at distance 0, √ turns a rounding difference of 1e-16 in 2 − 2ρ into 1e-8
    tol = 1e-7 if at_zero_distance else 1e-12
    assert results[1][0] == pytest.approx(results[0][0], rel=tol, abs=tol)
    if not at_zero_distance:  # (there both gradients are ~0: test_gradient_zero_at_rotated_scaled_shifted_copy)
        torch.testing.assert_close(results[1][1], results[0][1], atol=1e-9, rtol=1e-7)
        assert _gradcheck(ProcrustesLoss(output, method="gram"), X, Y, eps=1e-5)


@pytest.mark.parametrize("loss_name", SMOOTH_AT_MINIMUM)
@pytest.mark.parametrize("case", ["identical", "rotated_copy", "identical_n_below_width"])
def test_gradcheck_at_identical_geometry(loss_name, case):
    """The smooth forms pass gradcheck exactly at the minimum (identical inputs, rotated copy: repeated σ)."""
    X = _rand(20, 6, 9) if case == "identical_n_below_width" else _rand(20, 12, 5)
    Y = X @ _orthogonal(21, X.shape[1]) * 3.0 + 1.0 if case == "rotated_copy" else X.clone()
    assert _gradcheck(make_feature_loss(loss_name, X.shape[1], Y.shape[1]), X, Y)


@pytest.mark.parametrize("loss_name", GEOMETRY)
def test_gradient_zero_at_rotated_scaled_shifted_copy(loss_name):
    """At Y = c·X·Q + shift (Q orthogonal, here also into a wider space) every geometry loss is at its minimum 0
    and its gradient is ~0 (for √ and arccos: the subgradient 0, not NaN)."""
    X = _rand(30, 40, 6)
    Q = _orthogonal(31, 9)[:6]  # 6×9 with orthonormal rows: an isometry into the wider student space
    Y = (2.5 * X @ Q + 4.0).requires_grad_(True)
    losses = [make_feature_loss(loss_name, 6, 9)]
    if loss_name.startswith("procrustes"):
        losses.append(ProcrustesLoss(losses[0].output, method="gram"))
    for loss in losses:
        Y.grad = None
        value = loss(X, Y)
        value.backward()
        assert abs(value.item()) < 1e-7
        assert torch.isfinite(Y.grad).all()
        assert Y.grad.abs().max().item() < 1e-6


def test_procrustes_gradient_near_zero_is_bounded():
    """Near the minimum the √ form's gradient is bounded (the slope of a cone), not exploding."""
    X = _rand(40, 30, 5)
    for scale in (1e-2, 1e-4, 1e-6):
        Y = (X + scale * _rand(41, 30, 5)).requires_grad_(True)
        ProcrustesLoss()(X, Y).backward()
        assert torch.isfinite(Y.grad).all()
        assert Y.grad.norm().item() < 10.0 / X.norm().item() * math.sqrt(X.numel())


def test_nuclear_norm_gradient_is_the_polar_factor():
    """d‖M‖_*/dM = UVᵀ for full-rank M; for M with repeated and zero σ the gradient is finite, torch.svd's is not."""
    M = _rand(50, 6, 4)
    M.requires_grad_(True)
    nuclear_norm(M).backward()
    U, _, Vh = torch.linalg.svd(M.detach(), full_matrices=False)
    torch.testing.assert_close(M.grad, U @ Vh)
    D = torch.zeros(5, 4, dtype=DT)
    D[0, 0] = D[1, 1] = 1.0  # σ = (1, 1, 0, 0)
    D = (_orthogonal(51, 5) @ D @ _orthogonal(52, 4)).requires_grad_(True)
    nuclear_norm(D).backward()
    assert torch.isfinite(D.grad).all()
    assert torch.linalg.matrix_norm(D.grad, ord=2).item() == pytest.approx(1.0)
    D2 = D.detach().clone().requires_grad_(True)
    U, S, Vh = torch.linalg.svd(D2, full_matrices=False)
    (U @ torch.diag(S) @ Vh).sum().backward()  # differentiating U and V: the pitfall this module avoids
    assert not torch.isfinite(D2.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# training behaviour


@pytest.mark.parametrize("name", ["projection", "cka", "procrustes", "gram_frobenius", "procrustes[squared]"])
def test_adam_steps_decrease_the_loss(name):
    torch.manual_seed(0)
    teacher = torch.randn(64, 16)
    student = torch.randn(64, 8, requires_grad=True)
    loss = make_feature_loss(name, 16, 8)
    optimizer = torch.optim.Adam([student, *loss.parameters()], lr=0.05)
    values = []
    for _ in range(30):
        optimizer.zero_grad()
        value = loss(teacher, student)
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < 0.9 * values[0]


def test_projection_loss_blind_spot_that_procrustes_sees():
    """Student = teacher·A (A invertible, anisotropic): the projection loss reaches ~0, Procrustes does not."""
    teacher = _rand(60, 200, 8).float()
    A = _orthogonal(61, 8) @ torch.diag(torch.logspace(0, 1.5, 8, dtype=DT)) @ _orthogonal(62, 8)
    student = teacher @ A.float()
    projection = ProjectionLoss(8, 8)
    start = projection(teacher, student).item()
    optimizer = torch.optim.LBFGS(projection.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = projection(teacher, student)
        value.backward()
        return value

    optimizer.step(closure)
    assert projection(teacher, student).item() < 1e-6 * start
    assert ProcrustesLoss()(teacher, student).item() > 0.3
    assert GramFrobeniusLoss()(teacher, student).item() > 0.3


def test_projection_loss_optimum_is_the_in_sample_residual():
    """min over W, b of mean((YWᵀ + b − X)²) = projection residual (in-sample) · ‖Xc‖²_F / (n·p)."""
    n, p, q = 50, 7, 4
    X, Y = _rand(70, n, p), _rand(71, n, q) + _rand(70, n, p)[:, :q]
    design = torch.cat([Y, torch.ones(n, 1, dtype=DT)], 1)
    coef = torch.linalg.lstsq(design, X).solution  # (q + 1)×p
    projection = ProjectionLoss(p, q).double()
    with torch.no_grad():
        projection.proj.weight.copy_(coef[:q].T)
        projection.proj.bias.copy_(coef[q])
    Xc = X - X.mean(0)
    expected = slow_projection_residual(X.numpy(), Y.numpy()) * Xc.square().sum().item() / (n * p)
    assert projection(X, Y).item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# masks, dtypes, errors


def _masked_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher, student = _rand(seed, 3, 7, 6), _rand(seed + 1, 3, 7, 4)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return teacher, student, mask


@pytest.mark.parametrize("name", ["projection", "cka", "cka[debiased]", "procrustes", "gram_frobenius"])
def test_padding_never_affects_value_or_gradient(name):
    teacher, student, mask = _masked_batch(80)
    loss = make_feature_loss(name, 6, 4).double()
    pad = mask == 0

    def value_and_grad(t, s):
        s = s.clone().requires_grad_(True)
        value = loss(t, s, attention_mask=mask)
        value.backward()
        return value.detach(), s.grad

    v1, g1 = value_and_grad(teacher, student)
    teacher2, student2 = teacher.clone(), student.clone()
    teacher2[pad] = float("nan")  # pads may hold anything, even NaN
    student2[pad] = 1e6 * _rand(81, int(pad.sum()), 4)
    v2, g2 = value_and_grad(teacher2, student2)
    assert torch.equal(v1, v2)
    assert torch.equal(g1[~pad], g2[~pad])
    assert (g1[pad] == 0).all() and (g2[pad] == 0).all()
    # and the masked loss is the loss on the real rows, stacked by hand
    keep = mask.bool()
    assert loss(teacher[keep], student[keep]).item() == pytest.approx(v1.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius", "projection"])
def test_pooled_input_with_row_mask(name):
    """(batch, width) inputs take a (batch,) mask: the masked rows drop out."""
    X, Y = _rand(90, 12, 5), _rand(91, 12, 3)
    mask = torch.tensor([1] * 9 + [0] * 3)
    loss = make_feature_loss(name, 5, 3).double()
    assert loss(X, Y, attention_mask=mask).item() == pytest.approx(loss(X[:9], Y[:9]).item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius"])
def test_bf16_inputs_compute_in_float64_and_return_float32(name):
    teacher = _rand(100, 64, 12).bfloat16()
    student = _rand(101, 64, 6).bfloat16().requires_grad_(True)
    loss = make_feature_loss(name, 12, 6)
    value = loss(teacher, student)
    assert value.dtype == torch.float32
    reference = loss(teacher.double(), student.detach().double())
    assert value.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    value.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius", "projection"])
def test_autocast_does_not_lower_the_loss_precision(name):
    teacher, student = _rand(110, 48, 10).float(), _rand(111, 48, 5).float()
    loss = make_feature_loss(name, 10, 5)
    outside = loss(teacher, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(teacher, student)
    assert inside.dtype == torch.float32
    assert inside.item() == outside.item()


@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius"])
def test_float32_compute_close_to_float64(name):
    X, Y = _rand(120, 100, 12), _rand(121, 100, 7)
    loss_name, _, option = name.partition("[")
    cls = {"cka": CKALoss, "procrustes": ProcrustesLoss, "gram_frobenius": GramFrobeniusLoss}[loss_name]
    v64 = cls()(X, Y).item()
    v32 = cls(compute_dtype=torch.float32)(X.float(), Y.float())
    assert v32.dtype == torch.float32
    assert v32.item() == pytest.approx(v64, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius", "procrustes[angular]"])
def test_tiny_batches_are_finite(name, n):
    """n = 2 or 3 rows is enough for the biased estimators: finite value and gradient, never NaN."""
    student = _rand(131, n, 4).requires_grad_(True)
    value = make_feature_loss(name, 5, 4)(_rand(130, n, 5), student)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("n", [2, 3])
def test_debiased_cka_on_fewer_than_four_rows_is_an_error(n):
    with pytest.raises(UserError, match="at least 4"):
        CKALoss("debiased")(_rand(140, n, 5), _rand(141, n, 4))
    tokens = _rand(142, 1, 6, 5)
    mask = torch.tensor([[1] * n + [0] * (6 - n)])
    with pytest.raises(UserError, match="at least 4"):
        CKALoss("debiased")(tokens, tokens[..., :3], attention_mask=mask)


@pytest.mark.parametrize("name", ["cka", "procrustes", "gram_frobenius"])
def test_bad_input_raises_a_clear_error(name):
    loss = make_feature_loss(name, 5, 4)
    X, Y = _rand(150, 10, 5), _rand(151, 10, 4)
    with pytest.raises(UserError, match="at least 2"):
        loss(X[:1], Y[:1])
    with pytest.raises(UserError, match="zero variance"):
        loss(X, torch.ones(10, 4, dtype=DT))
    Xnan = X.clone()
    Xnan[3, 2] = float("nan")
    with pytest.raises(UserError, match="NaN or inf"):
        loss(Xnan, Y)
    with pytest.raises(UserError, match="same leading"):
        loss(X, Y[:9])
    with pytest.raises(UserError, match="attention_mask"):
        loss(X, Y, attention_mask=torch.ones(9))
    with pytest.raises(UserError, match="batch, width"):
        loss(X[0], Y[0])


def test_projection_loss_checks_widths():
    with pytest.raises(UserError, match="teacher width 5"):
        ProjectionLoss(5, 4)(_rand(160, 10, 6), _rand(161, 10, 4))


def test_teacher_gets_no_gradient():
    teacher = _rand(170, 20, 5).requires_grad_(True)
    student = _rand(171, 20, 3).requires_grad_(True)
    for name in ["cka", "procrustes", "gram_frobenius", "projection"]:
        make_feature_loss(name, 5, 3).double()(teacher, student).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_make_feature_loss_names():
    assert isinstance(make_feature_loss("projection", 8, 4), ProjectionLoss)
    assert make_feature_loss("projection", 8, 4).proj.weight.shape == (8, 4)
    assert make_feature_loss("procrustes", 8, 4).output == "distance"
    assert make_feature_loss("procrustes[angular]", 8, 4).output == "angular"
    assert make_feature_loss("gram_frobenius", 8, 4).squared is False
    assert make_feature_loss("gram_frobenius[squared]", 8, 4).squared is True
    assert make_feature_loss("cka", 8, 4).estimator == "biased"
    assert make_feature_loss("cka[linear,debiased]", 8, 4).estimator == "debiased"
    for bad in ["mse", "procrustes[cosine]", "cka[rbf]", "projection[ridge]"]:
        with pytest.raises(UserError, match="feature loss"):
            make_feature_loss(bad, 8, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cka", "cka[debiased]", "procrustes", "procrustes[squared]", "gram_frobenius"])
def test_cuda_matches_cpu_also_under_autocast(name):
    """On a GPU: same value and gradient as on the CPU (float64 compute), finite gradients on degenerate inputs
    (rotated copy: repeated σ; orthogonal student: zero cross-product), float32 loss under bf16 autocast."""
    X, Y = _rand(180, 4, 64, 12), _rand(181, 4, 64, 6)
    mask = (torch.arange(64) < torch.tensor([[64], [50], [33], [17]])).long()
    loss = make_feature_loss(name, 12, 6)

    def value_and_grad(device):
        y = Y.detach().to(device).clone().requires_grad_(True)
        value = loss(X.to(device), y, attention_mask=mask.to(device))
        value.backward()
        return value.item(), y.grad.cpu()

    v_cpu, g_cpu = value_and_grad("cpu")
    v_gpu, g_gpu = value_and_grad("cuda")
    assert v_gpu == pytest.approx(v_cpu, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g_gpu, g_cpu, atol=1e-10, rtol=1e-8)
    Q = _centered_orthonormal(182, 40, 8).cuda()
    for teacher, student in [(Q[:, :4], Q[:, :4] @ _orthogonal(183, 4).cuda()), (Q[:, :4], Q[:, 4:])]:
        student = student.clone().requires_grad_(True)
        loss(teacher, student).backward()
        assert torch.isfinite(student.grad).all()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_t = torch.nn.functional.linear(X.float().cuda(), torch.eye(12, device="cuda"))  # bf16 under autocast
        h_s = Y.float().cuda().requires_grad_(True)
        value = loss(h_t, h_s)
    assert h_t.dtype == torch.bfloat16 and value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(h_s.grad).all()
