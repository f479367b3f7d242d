"""Streaming sufficient statistics from which every linear metric is computed exactly.

Memory depends on the widths, never on the number of rows n: feed batches with :meth:`LayerMoments.update`,
combine accumulators with :meth:`~LayerMoments.merge` (any order, any batch sizes) or across
``torch.distributed`` ranks with :meth:`~LayerMoments.all_reduce`, then read the metrics.

What is accumulated (float64 by default), for teacher rows x_i ∈ ℝᵖ and student rows y_i ∈ ℝ^q, always
*centred at the running mean* (Chan et al. parallel update, so nothing cancels even when the data carry a large
offset): with x̄ = mean of x, u_i = x_i − x̄, v_i = y_i − ȳ, a_i = ‖u_i‖², b_i = ‖v_i‖²,

==============  ========================  =========================================
statistic       formula                   needed for
==============  ========================  =========================================
``n``           number of rows            all
``mean``        x̄, ȳ (as hi + lo pairs)     merging
``cov``         Σ u uᵀ  (p×p), Σ v vᵀ      all (trace A = Σ a_i = ‖X̃‖²_F before scaling)
``cross``       Σ u vᵀ  (p×q)              all
``quart``       Σ a_i², Σ b_i²             debiased CKA (denominator)
``cub``         Σ a_i u_i, Σ b_i v_i       merging ``quart``
``s_ab``        Σ a_i b_i                  debiased CKA (numerator)
``t_ay``        Σ a_i v_i  (q)             merging ``s_ab``
``t_bx``        Σ b_i u_i  (p)             merging ``s_ab``
==============  ========================  =========================================

Moving a state centred at its own mean m to a new centre c (d = m − c, δ = ‖d‖², and e, ε likewise for the
student side) is exact:

    cov  ← cov + n d dᵀ                     cross ← cross + n d eᵀ
    cub  ← cub + A d + 2 cov d + n δ d      quart ← quart + 4 dᵀcub + 4 dᵀcov d + 2 δ A + n δ²
    t_ay ← t_ay + A e + 2 crossᵀd + n δ e   t_bx  ← t_bx + B d + 2 cross e + n ε d
    s_ab ← s_ab + 2 eᵀt_ay + 2 dᵀt_bx + 4 dᵀcross e + ε A + δ B + n δ ε

so merging = move both parts to the pooled mean, then add; ``all_reduce`` = all-reduce n and the sum of rows to
get the global mean, move every rank's state there, then all-reduce (sum) every statistic.

Scale. Every statistic is kept for each layer's rows divided by 2^e, e per layer (``exp_t``, ``exp_s``) the
power-of-two exponent of the largest |entry| seen so far (2^(e−1) ≤ max|x| < 2^e), so nothing overflows or drops
into the subnormal range whatever the data's scale (1e−300 … 1e300), and the division is exact. A batch with a
larger maximum raises e; the state is then multiplied by the matching powers of two (a statistic of degree k in
the teacher rows and l in the student rows by 2^(−kΔ_t − lΔ_s)), exact up to contributions already below the new
scale's rounding. Merging and ``all_reduce`` first bring both sides to the larger exponents the same way. The
metrics are scale invariant, so they read the scaled statistics directly.

Zero variance is judged as in :mod:`repsim.measures.arrays`: a layer is refused when ‖X_c‖²_F = A ≤ τ²·(A + n‖x̄‖²)
(‖X‖²_F, from the running mean), τ = 16·√n·eps.

Metrics. Each metric is its family's ``finalize`` (:mod:`repsim.measures.families`) on every pair's moments in
the unit-Frobenius convention: X̃ᵀỸ = cross/√(AB), X̃ᵀX̃ = cov_x/A, ỸᵀỸ = cov_y/B (A = tr cov_x, B = tr cov_y),
Σ‖x̃_i‖⁴ = quart_x/A², Σ‖x̃_i‖²‖ỹ_i‖² = s_ab/(AB); the nuclear norms ‖cross‖_* are computed batched for all pairs
(repsim.measures.linalg.nuclear_norms). Metrics that need the rows (RBF CKA, the held-out residual, the moment
estimator of ρ) are refused with a UserError naming them.

Accuracy. The values are those of the in-memory functions up to rounding, except where the in-memory function
recomputes a cancelling difference from the rows (nearly identical inputs: 2 − 2ρ, the Gram-Frobenius
difference, the in-sample residual near 0), which moments cannot do: there the squared forms carry an absolute
error up to STREAMING_ACCURACY (the nuclear norm's accepted rounding bound of 1e-9 on ρ, doubled, plus the
moments' own rounding), so the distances √(·) near 0 carry up to √STREAMING_ACCURACY. A squared form that
cancelled to below its resolution (eps times its terms; below 0 included) is reported as max(|value|, that
resolution) (repsim.measures.linalg.clamp_rounding), within that accuracy, rather than as an exact 0 that would
claim identical inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from repsim.measures.arrays import (
    as_matrix,
    power_of_two_exponent,
    scale_by_power_of_two,
    variance_tolerance,
)
from repsim.measures.linalg import nuclear_norms
from repsim.measures.registry import Family, MetricSpec, PairMoments, families, get_metric
from repsim.system.errors import UserError

_PAIR_KEYS = ("cross", "s_ab", "t_ay", "t_bx")
#: absolute accuracy of the squared forms (2 − 2ρ, ‖X̃X̃ᵀ − ỸỸᵀ‖²_F, the in-sample residual) read from moments
#: (module docstring, Accuracy); the distances near 0 are accurate to its square root
STREAMING_ACCURACY = 1e-8
#: the scale exponent of a layer that has seen only zeros (below every float64 exponent)
_NO_SCALE = -2000


def _widths(widths: int | Sequence[int], name: str) -> list[int]:
    if isinstance(widths, (int, np.integer)):
        widths = [int(widths)]
    out = [int(w) for w in widths]
    if not out:
        raise UserError(f"{name} must list at least one layer width")
    if any(w < 1 for w in out):
        raise UserError(f"{name} must be positive integers, got {out}")
    return out


class LayerMoments:
    """Cross moments between every teacher layer and every student layer (Lt × Ls pairs), streamed.

    Per-layer self moments (mean, covariance, fourth-moment sums) are kept once per layer; pair moments are
    stored as one block matrix ``cross`` of shape (Σp, Σq) whose block (t, s) is Σ u_t v_sᵀ, so one batch update
    is one GEMM for all pairs. Memory: 8·(Σp·Σq + Σp² + Σq²) bytes in float64 (13×768 vs 7×384: ≈ 0.3 GB).

    Args:
        teacher_widths: width p_t of each teacher layer (an int for one layer).
        student_widths: width q_s of each student layer.
        dtype: accumulation dtype (float64 by default; float32 only if you accept rounding).
        device: where the statistics live (e.g. "cuda").
    """

    def __init__(
        self,
        teacher_widths: int | Sequence[int],
        student_widths: int | Sequence[int],
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.teacher_widths = _widths(teacher_widths, "teacher_widths")
        self.student_widths = _widths(student_widths, "student_widths")
        if not dtype.is_floating_point:
            raise UserError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0
        self.exp_t = [_NO_SCALE] * len(self.teacher_widths)  # statistics are of rows / 2^exp (module docstring)
        self.exp_s = [_NO_SCALE] * len(self.student_widths)
        lt, ls = len(self.teacher_widths), len(self.student_widths)
        pt, ps = sum(self.teacher_widths), sum(self.student_widths)
        z = self._zeros
        # the running mean as an unevaluated sum hi + lo (lo carries the digits hi cannot hold under an offset)
        self.mean_t, self.mean_s = z(pt), z(ps)
        self.mean_lo_t, self.mean_lo_s = z(pt), z(ps)
        self.cov_t = [z(p, p) for p in self.teacher_widths]
        self.cov_s = [z(q, q) for q in self.student_widths]
        self.quart_t, self.quart_s = z(lt), z(ls)
        self.cub_t, self.cub_s = z(pt), z(ps)
        self.cross = z(pt, ps)
        self.s_ab = z(lt, ls)
        self.t_ay = z(lt, ps)
        self.t_bx = z(ls, pt)
        self._seg_t = torch.repeat_interleave(torch.arange(lt, device=self.device),
                                              torch.tensor(self.teacher_widths, device=self.device))
        self._seg_s = torch.repeat_interleave(torch.arange(ls, device=self.device),
                                              torch.tensor(self.student_widths, device=self.device))

    # ------------------------------------------------------------------ helpers
    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    @property
    def teacher_mean(self) -> torch.Tensor:
        """Running mean of the teacher features, all layers side by side (Σp,), in the data's own units."""
        return self._unscaled(self.mean_t + self.mean_lo_t, self.exp_t, self.teacher_widths)

    @property
    def student_mean(self) -> torch.Tensor:
        """Running mean of the student features, all layers side by side (Σq,), in the data's own units."""
        return self._unscaled(self.mean_s + self.mean_lo_s, self.exp_s, self.student_widths)

    def _unscaled(self, v: torch.Tensor, exps: list[int], widths: list[int]) -> torch.Tensor:
        parts = [_scaled(p, -e) if e != _NO_SCALE else p for p, e in zip(v.split(widths), exps, strict=True)]
        return torch.cat(parts)

    @property
    def n_teacher_layers(self) -> int:
        return len(self.teacher_widths)

    @property
    def n_student_layers(self) -> int:
        return len(self.student_widths)

    def _empty_like(self) -> LayerMoments:
        return LayerMoments(self.teacher_widths, self.student_widths, dtype=self.dtype, device=self.device)

    def _segsum_rows(self, m: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
        """Sum the rows of ``m`` within each layer segment: (P, k) → (L, k)."""
        return torch.zeros(n_seg, m.shape[1], dtype=m.dtype, device=m.device).index_add_(0, seg, m)

    def _check_same_shape(self, other: LayerMoments) -> None:
        if not isinstance(other, LayerMoments):
            raise UserError(f"can only merge another {type(self).__name__}, got {type(other).__name__}")
        if other.teacher_widths != self.teacher_widths or other.student_widths != self.student_widths:
            raise UserError(
                f"cannot merge moments of different layer widths: teacher {self.teacher_widths} vs "
                f"{other.teacher_widths}, student {self.student_widths} vs {other.student_widths}")

    def _layers(self, batches: Any, widths: list[int], side: str) -> list[torch.Tensor]:
        if isinstance(batches, (torch.Tensor, np.ndarray)) and batches.ndim == 3:
            batches = list(batches)
        elif isinstance(batches, (torch.Tensor, np.ndarray)):
            raise UserError(f"{side} batches must be a list of (b, width) arrays or a (layers, b, width) array, "
                            f"got shape {tuple(batches.shape)}")
        batches = list(batches)
        if len(batches) != len(widths):
            raise UserError(f"expected {len(widths)} {side} layer batch(es), got {len(batches)}")
        out = []
        for i, (b, w) in enumerate(zip(batches, widths, strict=True)):
            # statistics are not differentiable: a batch that requires grad is read detached (no graph kept)
            t = as_matrix(b, f"{side} layer {i} batch", dtype=self.dtype, device=self.device).detach()
            if t.shape[1] != w:
                raise UserError(f"{side} layer {i} batch has width {t.shape[1]}, expected {w}")
            out.append(t)
        rows = {t.shape[0] for t in out}
        if len(rows) != 1:
            raise UserError(f"all {side} layer batches must have the same number of rows, got {sorted(rows)}")
        return out

    # ------------------------------------------------------------------ accumulation
    def update(self, teacher_batches: Any, student_batches: Any) -> LayerMoments:
        """Add a batch: ``teacher_batches`` is a list of (b, p_t) arrays (or a (Lt, b, p) array), rows paired
        with ``student_batches`` (list of (b, q_s) or (Ls, b, q)). Returns self."""
        xs = self._layers(teacher_batches, self.teacher_widths, "teacher")
        ys = self._layers(student_batches, self.student_widths, "student")
        if xs[0].shape[0] != ys[0].shape[0]:
            raise UserError(f"teacher and student batches must have the same number of rows (paired samples), "
                            f"got {xs[0].shape[0]} and {ys[0].shape[0]}")
        self._rescale([max(e, _exponent(x)) for e, x in zip(self.exp_t, xs, strict=True)],
                      [max(e, _exponent(y)) for e, y in zip(self.exp_s, ys, strict=True)])
        xs = [_scaled(x, e) for x, e in zip(xs, self.exp_t, strict=True)]
        ys = [_scaled(y, e) for y, e in zip(ys, self.exp_s, strict=True)]
        self._merge_in(self._batch_moments(xs, ys), consume=True)
        return self

    def _rescale(self, exp_t: list[int], exp_s: list[int]) -> None:
        """Express the statistics for rows / 2^exp (exponents only grow), in place: each statistic is multiplied
        by 2^(−kΔ_t − lΔ_s) for its degree k in teacher rows and l in student rows (exact powers of two)."""
        dt = [old - new for old, new in zip(self.exp_t, exp_t, strict=True)]
        ds = [old - new for old, new in zip(self.exp_s, exp_s, strict=True)]
        self.exp_t, self.exp_s = list(exp_t), list(exp_s)
        if self.n == 0 or not (any(dt) or any(ds)):
            return

        def powers(d: list[int], k: int, widths: list[int] | None = None) -> torch.Tensor:
            f = torch.tensor([math.ldexp(1.0, max(k * x, -2000)) for x in d], dtype=self.dtype, device=self.device)
            return f if widths is None else torch.repeat_interleave(
                f, torch.tensor(widths, device=self.device))

        t1, s1 = powers(dt, 1, self.teacher_widths), powers(ds, 1, self.student_widths)
        t2, s2 = powers(dt, 2), powers(ds, 2)
        self.mean_t, self.mean_lo_t = self.mean_t * t1, self.mean_lo_t * t1
        self.mean_s, self.mean_lo_s = self.mean_s * s1, self.mean_lo_s * s1
        self.cov_t = [c * f for c, f in zip(self.cov_t, t2, strict=True)]
        self.cov_s = [c * f for c, f in zip(self.cov_s, s2, strict=True)]
        self.quart_t, self.quart_s = self.quart_t * powers(dt, 4), self.quart_s * powers(ds, 4)
        self.cub_t = self.cub_t * powers(dt, 3, self.teacher_widths)
        self.cub_s = self.cub_s * powers(ds, 3, self.student_widths)
        self.cross = self.cross * t1[:, None] * s1[None, :]
        self.s_ab = self.s_ab * t2[:, None] * s2[None, :]
        self.t_ay = self.t_ay * t2[:, None] * s1[None, :]
        self.t_bx = self.t_bx * s2[:, None] * t1[None, :]

    def _batch_moments(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> LayerMoments:
        """Statistics of one batch, centred at the batch's own mean."""
        b = self._empty_like()
        b.exp_t, b.exp_s = list(self.exp_t), list(self.exp_s)
        b.n = xs[0].shape[0]
        us, a = b._side_moments(xs, b.cov_t, "t")
        vs, bb = b._side_moments(ys, b.cov_s, "s")
        u_all, v_all = torch.cat(us, dim=1), torch.cat(vs, dim=1)
        b.cross = u_all.T @ v_all
        b.s_ab = a.T @ bb
        b.t_ay = a.T @ v_all
        b.t_bx = bb.T @ u_all
        return b

    def _side_moments(self, xs: list[torch.Tensor], covs: list[torch.Tensor], side: str):
        means, los, centred, sq_norms, cubs = [], [], [], [], []
        for i, x in enumerate(xs):
            m = x.mean(dim=0)
            x0 = x - m  # exact for rows near their mean (Sterbenz)
            lo = x0.mean(dim=0)  # second pass: Σu must vanish to eps·|u|, not to eps·|x| (large offsets)
            u = x0 - lo
            a = (u * u).sum(dim=1)
            covs[i] = u.T @ u
            means.append(m)
            los.append(lo)
            centred.append(u)
            sq_norms.append(a)
            cubs.append(a @ u)
        sq = torch.stack(sq_norms, dim=1)  # (b, L)
        setattr(self, f"mean_{side}", torch.cat(means))
        setattr(self, f"mean_lo_{side}", torch.cat(los))
        setattr(self, f"quart_{side}", (sq * sq).sum(dim=0))
        setattr(self, f"cub_{side}", torch.cat(cubs))
        return centred, sq

    def _traces(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack([torch.trace(c) for c in self.cov_t])
        b = torch.stack([torch.trace(c) for c in self.cov_s])
        return a, b

    def _shift(self, d: torch.Tensor, e: torch.Tensor) -> None:
        """Move the statistics (centred at this state's mean) to the centre mean − (d, e), in place; the caller
        sets the new mean. Exact formulas in the module docstring; right-hand sides use the old values."""
        n = float(self.n)
        lt, ls = self.n_teacher_layers, self.n_student_layers
        A, B = self._traces()
        dt = list(d.split(self.teacher_widths))
        es = list(e.split(self.student_widths))
        delta = torch.stack([(x * x).sum() for x in dt])  # (Lt,)
        eps = torch.stack([(x * x).sum() for x in es])  # (Ls,)
        # pair pieces (old values on the right-hand side)
        e_t_ay = self._segsum_rows((self.t_ay * e).T, self._seg_s, ls).T  # (Lt, Ls): e_sᵀ t_ay[t, s-block]
        d_t_bx = self._segsum_rows((self.t_bx * d).T, self._seg_t, lt)  # (Lt, Ls): d_tᵀ t_bx[s, t-block]
        cross_e = self._segsum_rows((self.cross * e).T, self._seg_s, ls).T  # (Pt, Ls): cross[:, s] e_s
        d_cross = self._segsum_rows(d[:, None] * self.cross, self._seg_t, lt)  # (Lt, Ps): d_tᵀ cross[t, :]
        d_cross_e = self._segsum_rows(d[:, None] * cross_e, self._seg_t, lt)  # (Lt, Ls)
        self.s_ab = (self.s_ab + 2 * e_t_ay + 2 * d_t_bx + 4 * d_cross_e + eps[None, :] * A[:, None]
                     + delta[:, None] * B[None, :] + n * delta[:, None] * eps[None, :])
        self.t_ay = self.t_ay + A[:, None] * e[None, :] + 2 * d_cross + n * delta[:, None] * e[None, :]
        self.t_bx = (self.t_bx + B[:, None] * d[None, :] + 2 * cross_e.T
                     + n * eps[:, None] * d[None, :])
        self.cross = self.cross + n * torch.outer(d, e)
        # self pieces
        for side, covs, vecs, A_l, delta_l in (("t", self.cov_t, dt, A, delta), ("s", self.cov_s, es, B, eps)):
            cub = list(getattr(self, f"cub_{side}").split([v.shape[0] for v in vecs]))
            quart = getattr(self, f"quart_{side}").clone()
            for i, (c, v) in enumerate(zip(covs, vecs, strict=True)):
                cv = c @ v
                quart[i] = quart[i] + 4 * (v @ cub[i]) + 4 * (v @ cv) + 2 * delta_l[i] * A_l[i] + n * delta_l[i] ** 2
                cub[i] = cub[i] + A_l[i] * v + 2 * cv + n * delta_l[i] * v
                covs[i] = c + n * torch.outer(v, v)
            setattr(self, f"cub_{side}", torch.cat(cub))
            setattr(self, f"quart_{side}", quart)

    def _add(self, other: LayerMoments) -> None:
        """Add the statistics of ``other`` (both must be centred at the same point)."""
        self.n += other.n
        self.cov_t = [a + b for a, b in zip(self.cov_t, other.cov_t, strict=True)]
        self.cov_s = [a + b for a, b in zip(self.cov_s, other.cov_s, strict=True)]
        for key in ("quart_t", "quart_s", "cub_t", "cub_s", *_PAIR_KEYS):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def _merge_in(self, other: LayerMoments, consume: bool = False) -> None:
        """Absorb ``other``; ``consume`` lets this modify ``other`` in place (a throw-away batch state)."""
        if other.n == 0:
            return
        if self.n == 0:
            self.exp_t, self.exp_s = list(other.exp_t), list(other.exp_s)
            for key, value in other._tensors().items():
                setattr(self, key, value.clone())
            self.cov_t = [c.clone() for c in other.cov_t]
            self.cov_s = [c.clone() for c in other.cov_s]
            self.n = other.n
            return
        if not consume:
            other = other._copy()
        exp_t = [max(a, b) for a, b in zip(self.exp_t, other.exp_t, strict=True)]
        exp_s = [max(a, b) for a, b in zip(self.exp_s, other.exp_s, strict=True)]
        self._rescale(exp_t, exp_s)
        other._rescale(exp_t, exp_s)
        w = other.n / (self.n + other.n)
        # shifts from the mean difference (exact for nearby means), not from two rounded absolute means, so both
        # parts land on the same centre to within eps·|Δ| even when the data carry a large common offset
        delta_t = (other.mean_t - self.mean_t) + (other.mean_lo_t - self.mean_lo_t)
        delta_s = (other.mean_s - self.mean_s) + (other.mean_lo_s - self.mean_lo_s)
        self._shift(-w * delta_t, -w * delta_s)
        other._shift((1 - w) * delta_t, (1 - w) * delta_s)
        self._add(other)
        self.mean_t, self.mean_lo_t = _add_small(self.mean_t, self.mean_lo_t, w * delta_t)
        self.mean_s, self.mean_lo_s = _add_small(self.mean_s, self.mean_lo_s, w * delta_s)

    def merge(self, other: LayerMoments) -> LayerMoments:
        """Absorb ``other`` (same widths; rows of both count once). Exact and order-free. Returns self."""
        self._check_same_shape(other)
        if other.dtype != self.dtype or other.device != self.device:
            other = LayerMoments.from_state_dict(other.state_dict(), dtype=self.dtype, device=self.device)
        self._merge_in(other)
        return self

    def all_reduce(self, group: Any = None) -> LayerMoments:
        """Combine this accumulator with those of all ranks in ``group`` (torch.distributed), in place.

        (1) the row counts, and the pooled mean as a reference mean (the first rank with data, broadcast) plus the
        all-reduced Σ n_r·(mean_r − reference)/N; (2) after each rank moves its state to the pooled mean (exact
        shift), the sum of every statistic. Every rank ends with the pooled statistics. Returns self.

        Without an initialised process group (a plain ``python script.py``) there is one process, a world of one:
        the statistics are already the pooled ones and nothing changes. Naming a ``group`` then is an error.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise UserError("all_reduce got a process group, but torch.distributed is not initialised "
                                "(torch.distributed.init_process_group)")
            return self
        world = dist.get_world_size(group)
        exps = torch.tensor(self.exp_t + self.exp_s, dtype=torch.float64, device=self.device)
        dist.all_reduce(exps, op=dist.ReduceOp.MAX, group=group)  # one scale for all ranks (module docstring)
        exps = [int(e) for e in exps.tolist()]
        self._rescale(exps[:self.n_teacher_layers], exps[self.n_teacher_layers:])
        counts = torch.zeros(world, dtype=torch.float64, device=self.device)
        counts[dist.get_rank(group)] = float(self.n)
        dist.all_reduce(counts, group=group)
        nonempty = torch.nonzero(counts > 0).flatten().tolist()
        if not nonempty:
            return self
        n_total = int(round(float(counts.sum())))
        # reference centre: the mean of the first rank with data; every rank sends n_r·(mean_r − reference), small
        # numbers, so the pooled mean and each rank's shift keep their digits under a large common offset
        src = nonempty[0]
        pt = self.mean_t.shape[0]
        ref = torch.cat([self.mean_t, self.mean_s, self.mean_lo_t, self.mean_lo_s])
        dist.broadcast(ref, src=src if group is None else dist.get_global_rank(group, src), group=group)
        ref_hi, ref_lo = ref.chunk(2)
        if self.n > 0:
            local = ((torch.cat([self.mean_t, self.mean_s]) - ref_hi)
                     + (torch.cat([self.mean_lo_t, self.mean_lo_s]) - ref_lo))
        else:
            local = torch.zeros_like(ref_hi)
        offset = self.n * local
        dist.all_reduce(offset, group=group)
        offset = offset / n_total
        if self.n > 0:
            shift = local - offset
            self._shift(shift[:pt], shift[pt:])
        mean_hi, mean_lo = _add_small(ref_hi, ref_lo, offset)
        flat = torch.cat([t.reshape(-1) for t in self._summed_tensors()])
        dist.all_reduce(flat, group=group)
        offset = 0
        new = []
        for t in self._summed_tensors():
            new.append(flat[offset:offset + t.numel()].view_as(t).clone())
            offset += t.numel()
        self._set_summed_tensors(new)
        self.n = n_total
        self.mean_t, self.mean_s = mean_hi[:pt], mean_hi[pt:]
        self.mean_lo_t, self.mean_lo_s = mean_lo[:pt], mean_lo[pt:]
        return self

    def _summed_tensors(self) -> list[torch.Tensor]:
        return [*self.cov_t, *self.cov_s, self.quart_t, self.quart_s, self.cub_t, self.cub_s,
                *(getattr(self, k) for k in _PAIR_KEYS)]

    def _set_summed_tensors(self, tensors: list[torch.Tensor]) -> None:
        lt, ls = self.n_teacher_layers, self.n_student_layers
        self.cov_t, self.cov_s = tensors[:lt], tensors[lt:lt + ls]
        rest = tensors[lt + ls:]
        for key, value in zip(("quart_t", "quart_s", "cub_t", "cub_s", *_PAIR_KEYS), rest, strict=True):
            setattr(self, key, value)

    def _tensors(self) -> dict[str, torch.Tensor]:
        keys = ("mean_t", "mean_s", "mean_lo_t", "mean_lo_s", "quart_t", "quart_s", "cub_t", "cub_s", *_PAIR_KEYS)
        return {k: getattr(self, k) for k in keys}

    def _copy(self) -> LayerMoments:
        return LayerMoments.from_state_dict(self.state_dict(), dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All statistics as a flat dict of tensors (safe for ``torch.save(..., )``/``safetensors``; no pickle)."""
        d = {"n": torch.tensor(self.n, dtype=torch.int64),
             "teacher_widths": torch.tensor(self.teacher_widths, dtype=torch.int64),
             "student_widths": torch.tensor(self.student_widths, dtype=torch.int64)}
        d.update({k: v.clone() for k, v in self._tensors().items()})
        d["exp_t"] = torch.tensor(self.exp_t, dtype=torch.int64)
        d["exp_s"] = torch.tensor(self.exp_s, dtype=torch.int64)
        d.update({f"cov_t.{i}": c.clone() for i, c in enumerate(self.cov_t)})
        d.update({f"cov_s.{i}": c.clone() for i, c in enumerate(self.cov_s)})
        return d

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> LayerMoments:
        """Rebuild an accumulator from :meth:`state_dict` output."""
        try:
            tw = [int(w) for w in state["teacher_widths"].tolist()]
            sw = [int(w) for w in state["student_widths"].tolist()]
            dtype = dtype or state["cross"].dtype
            obj = LayerMoments.__new__(cls)
            LayerMoments.__init__(obj, tw, sw, dtype=dtype, device=device)
            obj.n = int(state["n"])
            # states saved before per-layer scaling hold unscaled statistics: exponent 0
            obj.exp_t = [int(e) for e in state.get("exp_t", torch.zeros(len(tw), dtype=torch.int64)).tolist()]
            obj.exp_s = [int(e) for e in state.get("exp_s", torch.zeros(len(sw), dtype=torch.int64)).tolist()]
            if len(obj.exp_t) != len(tw) or len(obj.exp_s) != len(sw):
                raise UserError("moments state entries 'exp_t'/'exp_s' do not match the layer widths")
            for k in obj._tensors():
                v = state[k].to(dtype=dtype, device=obj.device)
                if v.shape != getattr(obj, k).shape:
                    raise UserError(f"moments state entry {k!r} has shape {tuple(v.shape)}, "
                                    f"expected {tuple(getattr(obj, k).shape)}")
                setattr(obj, k, v.clone())
            obj.cov_t = [state[f"cov_t.{i}"].to(dtype=dtype, device=obj.device).clone() for i in range(len(tw))]
            obj.cov_s = [state[f"cov_s.{i}"].to(dtype=dtype, device=obj.device).clone() for i in range(len(sw))]
        except KeyError as exc:
            raise UserError(f"moments state is missing entry {exc.args[0]!r}") from exc
        return obj

    # ------------------------------------------------------------------ metrics
    def _require(self, min_rows: int, what: str) -> None:
        if self.n < min_rows:
            raise UserError(f"{what} needs at least {min_rows} samples (rows), got {self.n}")

    def _pair_blocks(self) -> list[list[torch.Tensor]]:
        rows = self.cross.split(self.teacher_widths, dim=0)
        return [list(r.split(self.student_widths, dim=1)) for r in rows]

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_t = tr cov_t, B_s = tr cov_s (the squared Frobenius norms of the centred layers); must be > 0."""
        A, B = self._traces()
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
                and bool(torch.isfinite(self.cross).all())):
            raise UserError("the moments are not finite (a state that was loaded or combined from non-finite "
                            "statistics); rebuild them from the data")
        tau2 = variance_tolerance(self.n, self.dtype) ** 2
        for name, v, mean, seg, count in (("teacher", A, self.mean_t + self.mean_lo_t, self._seg_t,
                                           self.n_teacher_layers),
                                          ("student", B, self.mean_s + self.mean_lo_s, self._seg_s,
                                           self.n_student_layers)):
            offset = self.n * torch.zeros(count, dtype=v.dtype, device=v.device).index_add_(0, seg, mean * mean)
            bad = torch.nonzero(~(v > tau2 * (v + offset))).flatten().tolist()
            if bad:
                raise UserError(f"{name} layer(s) {bad} have zero variance: all {self.n} rows are equal up to "
                                f"rounding (‖X − mean‖_F ≤ {math.sqrt(tau2):.1e}·‖X‖_F); the metric is undefined")
        return A, B

    def _nuclear(self) -> torch.Tensor:
        """‖cross_ts‖_* for every pair, (Lt, Ls), batched where the student widths agree (√eig of the small Gram
        where provably exact to 1e-9 relative to ‖cross‖, else svdvals; see repsim.measures.linalg.nuclear_norms)."""
        A, B = self._scales()
        out = self._zeros(self.n_teacher_layers, self.n_student_layers)
        uniform = len(set(self.student_widths)) == 1
        for t, blocks in enumerate(self._pair_blocks()):
            scale = torch.sqrt(A[t] * B)  # ρ = ‖cross‖_*/√(AB): the bound is on ρ
            if uniform:
                out[t] = nuclear_norms(torch.stack(blocks), scale)
            else:
                out[t] = torch.stack([nuclear_norms(b[None], scale[s])[0] for s, b in enumerate(blocks)])
        return out

    def _cross_sq(self) -> torch.Tensor:
        """‖cross_ts‖²_F for every pair, (Lt, Ls)."""
        sq = self.cross * self.cross
        sq = self._segsum_rows(sq, self._seg_t, self.n_teacher_layers)
        return self._segsum_rows(sq.T, self._seg_s, self.n_student_layers).T

    def _self_sq(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([(c * c).sum() for c in self.cov_t]), torch.stack([(c * c).sum() for c in self.cov_s]))

    def _values(self, family: Family, kwargs: dict[str, Any], what: str) -> torch.Tensor:
        """(Lt, Ls) values of a moments metric: the family's ``finalize`` on every pair's moments, scaled to the
        unit-Frobenius convention (X̃ᵀỸ = cross/√(AB), X̃ᵀX̃ = cov_x/A, Σ‖x̃_i‖⁴ = quart_x/A², ...). The batched
        statistics a family reads (``Family.needs``) are computed once for all pairs."""
        self._require(family.min_rows(**kwargs), what)
        A, B = self._scales()
        uses = family.needs(**kwargs)
        nuclear = self._nuclear() / torch.sqrt(A[:, None] * B[None, :]) if "nuclear" in uses else None
        cross_sq = self._cross_sq() / (A[:, None] * B[None, :]) if "cross_sq" in uses else None
        if "self_sq" in uses:
            kx, ky = self._self_sq()
            kx, ky = kx / A ** 2, ky / B ** 2
        blocks = self._pair_blocks()
        cov_t = [c / a for c, a in zip(self.cov_t, A, strict=True)]
        cov_s = [c / b for c, b in zip(self.cov_s, B, strict=True)]
        state_t = [family.layer_statistics(c, self.n, **kwargs) for c in cov_t]
        state_s = [family.layer_statistics(c, self.n, **kwargs) for c in cov_s]
        out = self._zeros(self.n_teacher_layers, self.n_student_layers)
        for t in range(self.n_teacher_layers):
            for s in range(self.n_student_layers):
                ab = A[t] * B[s]
                m = PairMoments(self.n, cov_t[t], cov_s[s], blocks[t][s] / torch.sqrt(ab),
                                nuclear=None if nuclear is None else nuclear[t, s],
                                cross_sq=None if cross_sq is None else cross_sq[t, s],
                                self_sq_x=kx[t] if "self_sq" in uses else None,
                                self_sq_y=ky[s] if "self_sq" in uses else None,
                                quart_x=self.quart_t[t] / A[t] ** 2, quart_y=self.quart_s[s] / B[s] ** 2,
                                s_ab=self.s_ab[t, s] / ab, state_x=state_t[t], state_y=state_s[s])
                out[t, s] = family.finalize(m, **kwargs)
        return out

    def procrustes_matrix(self, output: str = "distance") -> torch.Tensor:
        """Procrustes for every pair (see module docstring); output "distance" | "angular" | "squared" | "rho"."""
        if output == "similarity":
            output = "rho"
        return self._values(families()["procrustes"], {"output": output}, "procrustes")

    def gram_frobenius_matrix(self, squared: bool = False) -> torch.Tensor:
        """‖X̃X̃ᵀ − ỸỸᵀ‖_F (or its square) for every pair, from d×d moments only."""
        return self.matrix_tensor("gram_frobenius[squared]" if squared else "gram_frobenius")

    def cka_matrix(self, estimator: str = "biased") -> torch.Tensor:
        """Linear CKA for every pair; estimator "biased" (Kornblith 2019) or "debiased" (Song 2012 U-statistic)."""
        if estimator not in ("biased", "debiased"):
            raise UserError(f"linear CKA from moments supports estimator 'biased' or 'debiased', got {estimator!r}")
        return self.matrix_tensor(f"cka[linear,{estimator}]")

    def projection_residual_matrix(self, ridge: float = 0.0) -> torch.Tensor:
        """In-sample min_W ‖X̃ − ỸW‖²_F for every pair (1 − R² of predicting the teacher from the student).

        With ridge λ > 0: W = (ỸᵀỸ + λI)⁻¹ỸᵀX̃ on the unit-Frobenius-scaled data, value = fit error without the
        penalty. λ = 0 uses the pseudo-inverse (eigenvalues of ỸᵀỸ below
        repsim.measures.linalg.eigen_rank_cutoff count as 0).
        """
        if ridge < 0 or not math.isfinite(ridge):
            raise UserError(f"ridge must be a finite number ≥ 0, got {ridge}")
        return self._values(families()["projection_residual"], {"folds": None, "ridge": float(ridge)},
                            "projection_residual")

    def matrix_tensor(self, metric_id: str | MetricSpec) -> torch.Tensor:
        """(Lt, Ls) tensor of the metric (any id of ``repsim.measures.registry.get_metric`` whose statistics are
        "moments"); a metric that needs the rows is refused with a UserError naming it."""
        spec = get_metric(metric_id)
        if not spec.linear:
            raise UserError(f"metric {spec.id!r} ({spec.label}) is not computable from streaming moments: it needs "
                            "the rows, which these pooled moments do not keep; compute it in memory or with "
                            "repsim.pairwise on stored activations")
        return self._values(spec.family_object, dict(spec.kwargs), spec.id)

    def matrix(self, metric_id: str | MetricSpec) -> np.ndarray:
        """(Lt, Ls) float64 array of the metric ``metric_id`` (see :meth:`matrix_tensor`)."""
        return self.matrix_tensor(metric_id).detach().cpu().double().numpy()


class CrossMoments(LayerMoments):
    """Streaming moments of one (teacher, student) pair: X batches (b, p) with paired Y batches (b, q).

    ``update(Xb, Yb)``, ``merge``, ``all_reduce``, ``state_dict``/``from_state_dict`` as for
    :class:`LayerMoments`; each metric method returns a Python float, equal (to rounding) to the in-memory
    ``repsim.measures.functions`` function on all rows seen.
    """

    def __init__(self, p: int, q: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(p, (int, np.integer)) or not isinstance(q, (int, np.integer)):
            raise UserError(f"CrossMoments(p, q) takes two integer widths, got {p!r}, {q!r}")
        super().__init__([int(p)], [int(q)], dtype=dtype, device=device)

    @property
    def p(self) -> int:
        return self.teacher_widths[0]

    @property
    def q(self) -> int:
        return self.student_widths[0]

    def _empty_like(self) -> LayerMoments:
        return LayerMoments(self.teacher_widths, self.student_widths, dtype=self.dtype, device=self.device)

    def update(self, Xb: Any, Yb: Any) -> CrossMoments:  # type: ignore[override]
        """Add paired rows Xb (b, p) and Yb (b, q). Returns self."""
        return super().update([Xb], [Yb])  # type: ignore[return-value]

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> CrossMoments:
        obj = super().from_state_dict(state, dtype=dtype, device=device)
        if obj.n_teacher_layers != 1 or obj.n_student_layers != 1:
            raise UserError("this state holds several layers: load it with LayerMoments.from_state_dict")
        return obj  # type: ignore[return-value]

    def procrustes(self, output: str = "distance") -> float:
        """ρ = ‖X̃ᵀỸ‖_*; output "distance" √(2−2ρ), "angular" arccos ρ, "squared" 2−2ρ (or "rho")."""
        return float(self.procrustes_matrix(output)[0, 0])

    def gram_frobenius(self, squared: bool = False) -> float:
        """‖X̃X̃ᵀ − ỸỸᵀ‖_F (squared if asked)."""
        return float(self.gram_frobenius_matrix(squared)[0, 0])

    def cka(self, estimator: str = "biased") -> float:
        """Linear CKA, "biased" or "debiased"."""
        return float(self.cka_matrix(estimator)[0, 0])

    def projection_residual(self, ridge: float = 0.0) -> float:
        """In-sample min_W ‖X̃ − ỸW‖²_F."""
        return float(self.projection_residual_matrix(ridge)[0, 0])

    def value(self, metric_id: str) -> float:
        """The linear metric ``metric_id`` (e.g. "procrustes[angular]", "cka[linear,debiased]")."""
        return float(self.matrix(metric_id)[0, 0])


# ---------------------------------------------------------------------- shared output conventions
def _exponent(x: torch.Tensor) -> int:
    """Power-of-two exponent of max|x| (repsim.measures.arrays), _NO_SCALE for all zeros."""
    e = power_of_two_exponent(x)
    return _NO_SCALE if e is None else e


def _scaled(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x / 2^exponent (exact), x itself for exponent 0 or a layer that has seen only zeros."""
    return x if exponent in (0, _NO_SCALE) else scale_by_power_of_two(x, -exponent)


def _add_small(hi: torch.Tensor, lo: torch.Tensor, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi + lo) + small as a new unevaluated pair (hi', lo'), keeping the digits of ``small`` (Fast2Sum)."""
    t = lo + small
    new_hi = hi + t
    return new_hi, t - (new_hi - hi)
