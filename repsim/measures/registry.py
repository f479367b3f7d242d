"""The measure registry: every metric family in one module of :mod:`repsim.measures.families`, one parser.

A family (:class:`Family`, registered with :func:`register`) holds its id grammar, its :class:`MetricSpec`
(direction, range, invariances, label), its in-memory function and, for metrics that are functions of the pair's
second moments (``statistics == "moments"``), one :meth:`Family.finalize` from :class:`PairMoments`, in torch and
batched, which every engine calls (``repsim.pairwise``, ``LayerMoments``/``CrossMoments``, the bootstrap and the
permutation test, the losses). A family that needs the rows themselves (``statistics == "rows"``) gives engines
:meth:`Family.layer_state` / :meth:`Family.pair_values` instead; streaming engines refuse it by name.

Ids are ``family`` or ``family[tok,tok,key=val]`` (spaces ignored, lower case); :func:`get_metric` is the only
parser: it splits the bracket into bare flags and key=value options and hands them to the family's
:meth:`Family.parse`, which returns the spec with its canonical id.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from repsim.measures.arrays import ArrayLike, as_pair, to_output
from repsim.measures.linalg import dual_is_cheaper, nuclear_norm, nuclear_norms
from repsim.system.errors import UserError

__all__ = [
    "MetricSpec",
    "Family",
    "PairMoments",
    "register",
    "get_metric",
    "metric_names",
    "families",
    "finalize_by_teacher_layer",
    "layer_rows_only",
    "TRANSFORMS",
    "SHAPE_INVARIANCES",
    "STATISTICS",
    "DEFAULT_METRICS",
    "check_choice",
    "check_number",
]

#: transformations a metric may be invariant to, each applied to one side at a time
TRANSFORMS = ("translation", "isotropic_scale", "orthogonal", "permutation", "invertible_linear")
#: the invariances of a shape metric (centred, unit-Frobenius, orthogonal-invariant)
SHAPE_INVARIANCES = frozenset({"translation", "isotropic_scale", "orthogonal", "permutation"})
#: the metrics computed when none are named
DEFAULT_METRICS = ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]",
                   "projection_residual[folds=5,ridge=auto]")
#: what a metric needs from the data: "moments" (exact from PairMoments, streamable) or "rows"
STATISTICS = ("moments", "rows")


@dataclass(frozen=True)
class MetricSpec:
    """One metric with its convention: ``spec(X, Y)`` computes it (teacher X, student Y) in memory."""

    id: str
    family: str
    kwargs: Mapping[str, Any]
    direction: str  # "lower" or "higher" is more similar
    range: tuple[float, float]
    invariances: frozenset[str]
    symmetric: bool
    statistics: str  # "moments" (exact from PairMoments, streamable) or "rows" (needs the rows)
    label: str  # for plot colour bars
    #: further invariances when only the student Y is transformed: the unregularised projection residual sees only
    #: the student's column space, so any invertible linear map of the student is invisible (its blind spot)
    student_invariances: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', got {self.direction!r}")

    @property
    def linear(self) -> bool:
        """Exactly computable from second moments (streamable; ``statistics == "moments"``)."""
        return self.statistics == "moments"

    @property
    def plugin_biased(self) -> bool:
        """A plug-in estimate with a small-sample bias (:meth:`Family.plugin_biased`)."""
        return self.family_object.plugin_biased(**self.kwargs)

    @property
    def held_out_folds(self) -> int | None:
        """k of a k-fold held-out fit (:meth:`Family.held_out_folds`), None for other metrics."""
        return self.family_object.held_out_folds(**self.kwargs)

    @property
    def unregularised_folds(self) -> int | None:
        """k of an unregularised k-fold least-squares fit (:meth:`Family.unregularised_folds`), else None."""
        return self.family_object.unregularised_folds(**self.kwargs)

    @property
    def fits_in_sample(self) -> bool:
        """An in-sample fit that reaches 0 once n ≤ the predictor's width (:meth:`Family.fits_in_sample`)."""
        return self.family_object.fits_in_sample(**self.kwargs)

    @property
    def family_object(self) -> Family:
        """The registered :class:`Family` of this metric."""
        return _family(self.family, self.id)

    def __call__(self, X: ArrayLike, Y: ArrayLike) -> float | torch.Tensor:
        return self.family_object.evaluate(X, Y, **self.kwargs)

    def finalize(self, m: PairMoments) -> torch.Tensor:
        """The value from the pair's sufficient statistics (``statistics == "moments"`` only)."""
        if not self.linear:
            raise UserError(f"metric {self.id!r} is not a function of second moments (it needs the rows); "
                            "compute it in memory or with repsim.pairwise on stored activations")
        return self.family_object.finalize(m, **self.kwargs)

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetricSpec) and other.id == self.id


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """UserError unless ``value`` is one of ``allowed`` (a keyword argument of an in-memory function)."""
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_number(name: str, value: Any, strictly: bool = False) -> float:
    """``value`` as a finite float ≥ 0 (> 0 with ``strictly``); UserError otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v < 0 or (strictly and v == 0):
        raise UserError(f"{name} must be a finite number {'>' if strictly else '≥'} 0, got {value!r}")
    return v


class PairMoments:
    """Second moments of the centred, unit-Frobenius-scaled pair (X̃, Ỹ), ‖X̃‖_F = ‖Ỹ‖_F = 1.

    ``n`` rows; ``cov_x`` = X̃ᵀX̃ (..., p, p), ``cov_y`` = ỸᵀỸ (..., q, q), ``cross`` = X̃ᵀỸ (..., p, q). Every
    tensor may carry leading pair dimensions (none for one pair, (Lt, Ls) for all layer pairs), and the
    families' results have them. Optional statistics, filled by engines that have them cheaply:
    ``nuclear`` ‖X̃ᵀỸ‖_*, ``cross_sq`` ‖X̃ᵀỸ‖²_F, ``self_sq_x``/``self_sq_y`` ‖X̃ᵀX̃‖²_F, ‖ỸᵀỸ‖²_F, ``quart_x``/
    ``quart_y``/``s_ab`` Σ‖x̃_i‖⁴, Σ‖ỹ_i‖⁴, Σ‖x̃_i‖²‖ỹ_i‖² (debiased HSIC), ``state_x``/``state_y`` the family's
    :meth:`Family.layer_statistics`, and ``rows_x``/``rows_y``: the rows themselves when the engine holds them
    (one pair: X̃ (n, p) and Ỹ (n, q); pair dimensions (Lt, Ls): a sequence of Lt teacher and Ls student row
    matrices, any factor F = X̃Q with Q orthogonal, as all linear metrics are unchanged by it; rows may be in any
    common order). Streaming engines leave them None. ``explained``: the in-sample projection residual's explained
    part Σ_k w_k ‖X̃ᵀỸ q_k‖² for the metric's ridge, from an engine that computes it batched.

    ``cov_x``, ``cov_y`` and ``cross`` may be omitted when ``rows_x``/``rows_y`` are given (one pair): they are
    then formed from the rows on first use. The accessors :meth:`nuclear_norm`, :meth:`cross_sq_norm`,
    :meth:`self_sq_norms` and :meth:`debiasing_sums` return the engine's value when it gave one and compute it
    (differentiably for one pair) otherwise.
    """

    def __init__(self, n: int, cov_x: torch.Tensor | None = None, cov_y: torch.Tensor | None = None,
                 cross: torch.Tensor | None = None, *, nuclear: torch.Tensor | None = None,
                 cross_sq: torch.Tensor | None = None, self_sq_x: torch.Tensor | None = None,
                 self_sq_y: torch.Tensor | None = None, quart_x: torch.Tensor | None = None,
                 quart_y: torch.Tensor | None = None, s_ab: torch.Tensor | None = None, state_x: Any = None,
                 state_y: Any = None, rows_x: Any = None, rows_y: Any = None,
                 explained: torch.Tensor | None = None) -> None:
        self.n = int(n)
        self._cov_x, self._cov_y, self._cross = cov_x, cov_y, cross
        self.nuclear, self.cross_sq = nuclear, cross_sq
        self.self_sq_x, self.self_sq_y = self_sq_x, self_sq_y
        self.quart_x, self.quart_y, self.s_ab = quart_x, quart_y, s_ab
        self.state_x, self.state_y = state_x, state_y
        self.rows_x, self.rows_y = rows_x, rows_y
        self.explained = explained

    @classmethod
    def from_rows(cls, Xt: torch.Tensor, Yt: torch.Tensor, **statistics: Any) -> PairMoments:
        """The moments of one pair of prepared (centred, unit-Frobenius) row matrices, keeping the rows."""
        return cls(Xt.shape[0], rows_x=Xt, rows_y=Yt, **statistics)

    def _frobenius_from_grams(self) -> bool:
        """With one pair's rows and no engine values: fill ‖X̃ᵀỸ‖²_F = ⟨K, L⟩, ‖X̃ᵀX̃‖²_F = ‖K‖²_F, ‖ỸᵀỸ‖²_F = ‖L‖²_F
        from K = X̃X̃ᵀ, L = ỸỸᵀ where that n × n form is cheaper (:func:`repsim.measures.linalg.dual_is_cheaper`)."""
        X, Y = self.rows_x, self.rows_y
        if not (isinstance(X, torch.Tensor) and isinstance(Y, torch.Tensor) and X.ndim == 2) or \
                self._cross is not None or not dual_is_cheaper(X.shape[0], X.shape[1], Y.shape[1]):
            return False
        K, L = X @ X.T, Y @ Y.T
        if self.cross_sq is None:
            self.cross_sq = (K * L).sum()
        if self.self_sq_x is None:
            self.self_sq_x = K.square().sum()
        if self.self_sq_y is None:
            self.self_sq_y = L.square().sum()
        return True

    def _rows_pair(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.rows_x, torch.Tensor) or not isinstance(self.rows_y, torch.Tensor):
            raise UserError(f"these pair moments hold no {what}")
        return self.rows_x, self.rows_y

    @property
    def cov_x(self) -> torch.Tensor:
        if self._cov_x is None:
            X, _ = self._rows_pair("cov_x")
            self._cov_x = X.T @ X
        return self._cov_x

    @property
    def cov_y(self) -> torch.Tensor:
        if self._cov_y is None:
            _, Y = self._rows_pair("cov_y")
            self._cov_y = Y.T @ Y
        return self._cov_y

    @property
    def cross(self) -> torch.Tensor:
        if self._cross is None:
            X, Y = self._rows_pair("cross")
            self._cross = X.T @ Y
        return self._cross

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading pair dimensions (() for one pair)."""
        if self.nuclear is not None:
            return tuple(self.nuclear.shape)
        if self.cross_sq is not None:
            return tuple(self.cross_sq.shape)
        return tuple(self.cross.shape[:-2])

    def pair_rows(self, index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X̃, Ỹ) of the pair at ``index`` in the leading dimensions, or None when the engine holds no rows."""
        if self.rows_x is None or self.rows_y is None:
            return None
        if isinstance(self.rows_x, torch.Tensor) and self.rows_x.ndim == 2:
            return self.rows_x, self.rows_y
        return self.rows_x[index[0]], self.rows_y[index[-1]]

    def nuclear_norm(self) -> torch.Tensor:
        """‖X̃ᵀỸ‖_* (the engine's, else batched singular values; one pair: differentiable, gradient the polar
        factor, singular values below max(n, p, q)·eps counting as zero in the gradient)."""
        if self.nuclear is None:
            c = self.cross
            if c.ndim == 2:
                self.nuclear = nuclear_norm(c, atol=max(self.n, *c.shape) * torch.finfo(c.dtype).eps)
            else:
                self.nuclear = nuclear_norms(c.detach())
        return self.nuclear

    def cross_sq_norm(self) -> torch.Tensor:
        """‖X̃ᵀỸ‖²_F."""
        if self.cross_sq is None and not self._frobenius_from_grams():
            self.cross_sq = self.cross.square().sum(dim=(-2, -1))
        return self.cross_sq

    def self_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖X̃ᵀX̃‖²_F, ‖ỸᵀỸ‖²_F)."""
        if self.self_sq_x is None or self.self_sq_y is None:
            self._frobenius_from_grams()
        if self.self_sq_x is None:
            self.self_sq_x = self.cov_x.square().sum(dim=(-2, -1))
        if self.self_sq_y is None:
            self.self_sq_y = self.cov_y.square().sum(dim=(-2, -1))
        return self.self_sq_x, self.self_sq_y

    def debiasing_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ‖x̃_i‖⁴, Σ‖ỹ_i‖⁴, Σ‖x̃_i‖²‖ỹ_i‖²), from the rows of one pair when the engine gave none."""
        if self.quart_x is None or self.quart_y is None or self.s_ab is None:
            X, Y = self._rows_pair("debiasing sums (Σ‖x̃_i‖⁴, Σ‖x̃_i‖²‖ỹ_i‖²)")
            a, b = X.square().sum(dim=1), Y.square().sum(dim=1)
            self.quart_x, self.quart_y, self.s_ab = a @ a, b @ b, a @ b
        return self.quart_x, self.quart_y, self.s_ab


def layer_rows_only(m: PairMoments) -> bool:
    """Whether ``m`` carries pair dimensions and, instead of covariances, only each layer's rows (what
    ``repsim.pairwise`` hands a family that reads no batched statistic): :func:`finalize_by_teacher_layer`."""
    return m._cov_x is None and m._cross is None and m.rows_x is not None and not isinstance(m.rows_x, torch.Tensor)


def _padded_gram(A: torch.Tensor, B: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """AᵀB zero-padded to (rows, cols)."""
    out = A.new_zeros(rows, cols)
    out[:A.shape[1], :B.shape[1]] = A.T @ B
    return out


def finalize_by_teacher_layer(family: Family, m: PairMoments, **kwargs: Any) -> torch.Tensor:
    """(Lt, Ls) values of a moments family from rows-only pair moments (:func:`layer_rows_only`): each layer's
    covariance and :meth:`Family.layer_statistics` once, then one teacher layer at a time against all student
    layers (``finalize`` batched over the students; memory Ls·p·q, no copy of the rows). Layers of one side are
    zero-padded to a common width, which changes no second-moment metric (zero columns add no variance,
    covariance or singular value); the rows stay available for refinement."""
    rows_x, rows_y = list(m.rows_x), list(m.rows_y)
    p, q = max(r.shape[1] for r in rows_x), max(r.shape[1] for r in rows_y)
    cov_s = torch.stack([_padded_gram(r, r, q, q) for r in rows_y])
    state_s = [family.layer_statistics(c, m.n, **kwargs) for c in cov_s]
    stacked_s = None if state_s[0] is None else torch.stack(state_s)
    ls = len(rows_y)
    out = []
    for x in rows_x:
        cov = _padded_gram(x, x, p, p)
        state = family.layer_statistics(cov, m.n, **kwargs)
        pair = PairMoments(m.n, cov.expand(ls, p, p), cov_s, torch.stack([_padded_gram(x, y, p, q) for y in rows_y]),
                           state_x=None if state is None else state.expand(ls, *state.shape), state_y=stacked_s,
                           rows_x=[x] * ls, rows_y=rows_y)
        out.append(family.finalize(pair, **kwargs))
    return torch.stack(out)


class Family:
    """Base class of a metric family; one instance per module, registered with :func:`register`.

    Subclasses set ``name``, ``grammar``, ``examples`` (canonical ids listed by :func:`metric_names`) and
    ``aliases`` and implement :meth:`parse` and :meth:`compute`; families of ``statistics == "moments"`` metrics
    implement :meth:`finalize` (and optionally :meth:`layer_statistics`); families of ``"rows"`` metrics may
    override :meth:`layer_state`/:meth:`pair_values` (the defaults compute every pair in memory).
    """

    name: ClassVar[str] = ""
    grammar: ClassVar[str] = ""
    examples: ClassVar[tuple[str, ...]] = ()
    aliases: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: the optional PairMoments statistics :meth:`finalize` reads ("nuclear", "cross_sq", "self_sq", "debiasing",
    #: "explained"): engines that compute them batched fill them. Non-empty means that, given these, finalize needs
    #: nothing else but n and the rows (``pair_rows``), so engines that hold only these (the bootstrap's Gram path:
    #: cross_sq and self_sq; its Procrustes path: nuclear) may use it; empty: finalize reads cov_x, cov_y, cross.
    uses: ClassVar[frozenset[str]] = frozenset()

    # ---------------------------------------------------------------- parsing
    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        """The spec of ``text`` (bare ``flags`` and key=value ``options`` of its bracket); UserError naming
        ``grammar`` on anything unknown."""
        raise NotImplementedError

    def error(self, text: str, why: str | None = None) -> UserError:
        """A UserError for the id ``text``: ``why``, or the family's grammar."""
        return UserError(f"metric {text!r}: {why or f'expected {self.grammar}'}")

    def number(self, options: dict[str, str], key: str, default: float, text: str) -> float:
        """A finite float option (``default`` when absent)."""
        token = options.get(key)
        if token is None:
            return default
        try:
            value = float(token)
        except ValueError:
            raise self.error(text, f"{key} must be a number, got {token!r}") from None
        if not math.isfinite(value):
            raise self.error(text, f"{key} must be finite, got {token!r}")
        return value

    def integer(self, options: dict[str, str], key: str, default: int | None, text: str, minimum: int) -> int | None:
        """An integer option ≥ ``minimum`` (``default`` when absent)."""
        token = options.get(key)
        if token is None:
            return default
        if not token.isdigit() or int(token) < minimum:
            raise self.error(text, f"{key} must be an integer ≥ {minimum}, got {token!r}")
        return int(token)

    def needs(self, **kwargs: Any) -> frozenset[str]:
        """The optional PairMoments statistics :meth:`finalize` reads for this convention (default ``uses``)."""
        return self.uses

    def plugin_biased(self, **kwargs: Any) -> bool:
        """Whether this convention is a plug-in estimate whose bias dominates at small n (two unrelated layers of
        rank r score a level that falls only like r/n or √(r/n)); the comparison warns below 10·r rows."""
        return False

    def held_out_folds(self, **kwargs: Any) -> int | None:
        """k when the value is a k-fold held-out fit: bootstrap replicates then put copies of one text on both sides
        of a fold (optimistic intervals), so the comparison leaves it out of its default statistics."""
        return None

    def unregularised_folds(self, **kwargs: Any) -> int | None:
        """k when the value is an unregularised k-fold least-squares fit, whose held-out error grows like
        n_tr/(n_tr − q − 1) with n_tr training rows per fold and q predictors (the comparison warns)."""
        return None

    def fits_in_sample(self, **kwargs: Any) -> bool:
        """Whether the value is an in-sample fit that is exactly 0 once the predictor reaches rank n − 1 (a blind
        spot at n ≤ width, not similarity; the comparison warns)."""
        return False

    # ---------------------------------------------------------------- in memory
    def min_rows(self, **kwargs: Any) -> int:
        """Fewest rows the metric is defined on."""
        return 2

    def compute(self, X: torch.Tensor, Y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The value in memory: X (n, p), Y (n, q) validated tensors (not centred); a 0-dim tensor."""
        raise NotImplementedError

    def evaluate(self, X: ArrayLike, Y: ArrayLike, **kwargs: Any) -> float | torch.Tensor:
        """Validate any array input (float64), :meth:`compute`, return a float (numpy input) or a 0-dim tensor."""
        Xt, Yt = as_pair(X, Y, min_rows=self.min_rows(**kwargs))
        return to_output(self.compute(Xt, Yt, **kwargs), X)

    # ---------------------------------------------------------------- from moments
    def layer_statistics(self, cov: torch.Tensor, n: int, **kwargs: Any) -> Any:
        """Per-layer work done once and reused for every pair (default: none)."""
        return None

    def finalize(self, m: PairMoments, **kwargs: Any) -> torch.Tensor:
        """The exact value from the pair's sufficient statistics, batched over m's leading dimensions."""
        raise UserError(f"metric family {self.name!r} is not a function of second moments")

    # ---------------------------------------------------------------- from rows
    def layer_state(self, X: torch.Tensor, **kwargs: Any) -> Any:
        """Per-layer work for a rows metric (default: the validated rows themselves)."""
        return X

    def pair_values(self, states_t: Sequence[Any], states_s: Sequence[Any], **kwargs: Any) -> torch.Tensor:
        """(Lt, Ls) values of a rows metric from per-layer states (default: :meth:`compute` pair by pair)."""
        first = states_t[0]
        out = torch.empty(len(states_t), len(states_s), dtype=torch.float64, device=first.device)
        for i, x in enumerate(states_t):
            for j, y in enumerate(states_s):
                out[i, j] = self.compute(x, y, **kwargs)
        return out


_FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, str] = {}


def register(family: Family) -> Family:
    """Add a family (one instance) to the registry; its name and aliases must be new."""
    if not family.name or not re.fullmatch(r"[a-z_][a-z0-9_]*", family.name):
        raise ValueError(f"a family name must be a lower-case identifier, got {family.name!r}")
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"metric family {family.name!r} is already registered")
    for alias in family.aliases:
        if _ALIASES.get(alias, family.name) != family.name:
            raise ValueError(f"alias {alias!r} is already taken by family {_ALIASES[alias]!r}")
    _FAMILIES[family.name] = family
    _ALIASES.update({alias: family.name for alias in family.aliases})
    return family


def families() -> dict[str, Family]:
    """The registered families by name."""
    return dict(_FAMILIES)


def metric_names() -> list[str]:
    """Every registered family's canonical example ids, in registration order."""
    return [name for fam in _FAMILIES.values() for name in fam.examples]


def _family(name: str, text: str) -> Family:
    fam = _FAMILIES.get(name)
    if fam is None:
        examples = ", ".join(f.examples[0] for f in _FAMILIES.values() if f.examples)
        aliases = ", ".join(sorted({a for f in _FAMILIES.values() for a in f.aliases}))
        raise UserError(f"unknown metric {text!r}; known: one id per family, e.g. {examples} (every id: "
                        f"repsim.measures.registry.metric_names()), and the aliases {aliases}")
    return fam


_ID_PATTERN = re.compile(r"^(?P<family>[a-z_][a-z0-9_]*)(?:\[(?P<args>[^\[\]]*)\])?$")


@dataclass(frozen=True)
class _Parsed:
    family: str
    flags: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)


def _split(text: str, original: str) -> _Parsed:
    match = _ID_PATTERN.match(text)
    if match is None:
        _family("", original)  # raises with the known ids
    tokens = [t for t in (match["args"] or "").split(",") if t]
    flags = [t for t in tokens if "=" not in t]
    options: dict[str, str] = {}
    for t in tokens:
        if "=" in t:
            key, value = t.split("=", 1)
            if key in options:
                raise UserError(f"metric {original!r}: option {key!r} given twice")
            options[key] = value
    return _Parsed(match["family"], flags, options)


def get_metric(spec: str | MetricSpec) -> MetricSpec:
    """The :class:`MetricSpec` for a metric id, an alias (``procrustes``, ``cka``, ``angular``, ...) or a spec.

    Accepts ``family`` or ``family[tok,tok,key=val]`` (spaces ignored, any case) for every registered family,
    e.g. ``cka[rbf,sigma=0.5]``, ``projection_residual[folds=10]``; raises
    :class:`~repsim.system.errors.UserError` naming an unknown id, or the family's grammar for unknown options.
    """
    if isinstance(spec, MetricSpec):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"a metric id must be a string, got {type(spec).__name__}")
    text = re.sub(r"\s+", "", spec).lower()
    name = _ALIASES.get(text)
    if name is not None:
        text = _FAMILIES[name].aliases[text]
    parsed = _split(text, spec)
    fam = _family(parsed.family, spec)
    return fam.parse(parsed.flags, parsed.options, spec)
