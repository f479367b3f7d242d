"""Nearest-neighbour alignment (Huh, Cheung, Wang & Isola, ICML 2024, "The Platonic Representation Hypothesis"):
``mutual_knn[k=K]`` and ``cknna[k=K]``, as in their code (platonic-rep's ``AlignmentMetrics``).

Each side is prepared by the shared rule (columns centred; the unit Frobenius scaling changes nothing here) and its
rows scaled to unit length, as platonic-rep's pipeline does before every metric, so the kernel is the cosine
similarity K = X̂X̂ᵀ. N(i) is the set of the k rows with the largest K_ij, j ≠ i (self excluded).

- ``mutual_knn``: mean over rows i of |N_X(i) ∩ N_Y(i)|/k, in [0, 1] (1 for a layer with itself).
- ``cknna`` (centred kernel nearest-neighbour alignment): with M_ij = [j ∈ N_X(i)]·[j ∈ N_Y(i)] (row-wise, not
  symmetric), s(K, L) = HSIC_u(M∘K, M∘L), Song et al.'s unbiased HSIC on the masked kernels,
  HSIC_u(A, B) = [Σᵢⱼ AᵢⱼBⱼᵢ + (1ᵀA1)(1ᵀB1)/((n − 1)(n − 2)) − 2·1ᵀAB1/(n − 2)]/(n(n − 3)), and
  cknna = s(K, L)/√(s(K, K)·s(L, L)), each self-term with its own side's mask. Not symmetric in general (1ᵀAB1 ≠
  1ᵀBA1 for non-symmetric masks), and not bounded by 1 (the masked form is not an inner product). platonic-rep adds
  1e-6 to the denominator, which makes its value depend on the data's scale (1e-4 relative on unit rows); it is
  left out. n ≥ 4 and 2 ≤ k ≤ n − 1.

Both are invariant to translation (centred columns), isotropic scaling, orthogonal maps and permutations of the
features (they see only the cosine kernel), symmetric for mutual_knn, higher = more similar. With ``center=False``
they are platonic-rep's ``compute_score(..., normalize=True)`` (without its outlier clipping).

Cost: each layer's neighbour lists (n × k indices and kernel values, from row blocks of X̂X̂ᵀ: O(n²·width)) once;
each teacher layer then meets all student layers at once by a batched sorted search, O(L_s·n·k·log k) per teacher
layer, with no n × n matrix per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.registry import SHAPE_INVARIANCES, Family, MetricSpec, register
from repsim.system.errors import UserError

#: entries of the similarity matrix formed at once (bounds the temporary memory to 32 MB)
BLOCK_ENTRIES = 1 << 22


@dataclass
class Neighbours:
    """One layer's neighbour lists: ``index`` (n, k) ascending per row, ``kernel`` (n, k) the cosine similarity to
    each, ``mutual`` (n, k) whether row i is also among its neighbour's neighbours, ``self_similarity`` s(K, K)."""

    index: torch.Tensor
    kernel: torch.Tensor
    mutual: torch.Tensor
    self_similarity: torch.Tensor | None


def unit_rows(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; a row of length 0 stays 0 (torch's ``F.normalize`` rule)."""
    norms = X.norm(dim=1, keepdim=True)
    return X / torch.where(norms > 0, norms, torch.ones_like(norms))


def neighbour_lists(R: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, kernel) of the k largest R_iR_jᵀ, j ≠ i, per row, the indices ascending within each row."""
    n = R.shape[0]
    index = torch.empty(n, k, dtype=torch.long, device=R.device)
    kernel = torch.empty(n, k, dtype=R.dtype, device=R.device)
    step = max(1, BLOCK_ENTRIES // max(n, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        S = R[lo:hi] @ R.T
        rows = torch.arange(hi - lo, device=R.device)
        S[rows, rows + lo] = -torch.inf
        vals, idx = torch.topk(S, k, dim=1)
        idx, order = torch.sort(idx, dim=1)
        index[lo:hi], kernel[lo:hi] = idx, vals.gather(1, order)
    return index, kernel


def _find(index_s: torch.Tensor, index_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry j = index_t[..., i, a]: (position of j in row i of index_s, whether it is there)."""
    pos = torch.searchsorted(index_s, index_t.contiguous()).clamp(max=index_s.shape[-1] - 1)
    return pos, index_s.gather(-1, pos) == index_t


def _hsic_masked(found: torch.Tensor, mutual: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 index: torch.Tensor, n: int) -> torch.Tensor:
    """HSIC_u(M∘K, M∘L) from the teacher's neighbour slots (…, n, k): ``found`` M at each slot, ``mutual`` whether
    the transposed entry is in M too, ``a``/``b`` K and L at each slot, ``index`` the slot's column."""
    A = torch.where(found, a, torch.zeros_like(a))
    B = torch.where(found, b, torch.zeros_like(b))
    trace = (torch.where(mutual, A * B, torch.zeros_like(A))).sum(dim=(-2, -1))  # Σ A_ij B_ji (K, L symmetric)
    col = torch.zeros(*A.shape[:-2], n, dtype=A.dtype, device=A.device)
    col = col.scatter_add(-1, index.expand_as(A).reshape(*A.shape[:-2], -1), A.reshape(*A.shape[:-2], -1))
    cross = (col * B.sum(dim=-1)).sum(dim=-1)  # 1ᵀAB1 = Σ_j (column sums of A)_j (row sums of B)_j
    total = A.sum(dim=(-2, -1)) * B.sum(dim=(-2, -1))
    return (trace + total / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def layer_neighbours(X: torch.Tensor, k: int, center: bool = True, similarity: bool = False,
                     name: str = "X") -> Neighbours:
    """One layer's :class:`Neighbours` (``self_similarity`` only when ``similarity``)."""
    n = X.shape[0]
    if not 1 <= k <= n - 1:
        raise UserError(f"k must lie in [1, n − 1] = [1, {n - 1}] for {n} samples, got {k}")
    R = unit_rows(prepare(X, center, name))
    index, kernel = neighbour_lists(R, k)
    _, mutual = _find(index[index], torch.arange(n, device=X.device)[:, None, None].expand(n, k, 1))
    mutual = mutual.squeeze(-1)
    state = Neighbours(index, kernel, mutual, None)
    if similarity:
        found = torch.ones_like(mutual)
        state.self_similarity = _hsic_masked(found, mutual, kernel, kernel, index, n)
        if not float(state.self_similarity) > 0:
            raise UserError(f"the masked self-HSIC of {name} is not positive (k={k}, n={n}): cknna is undefined")
    return state


def pair_neighbour_values(states_t: Sequence[Neighbours], states_s: Sequence[Neighbours],
                          kind: str) -> torch.Tensor:
    """(L_t, L_s) mutual_knn or cknna values; one batched search per teacher layer against every student layer."""
    index_s = torch.stack([s.index for s in states_s])  # (L_s, n, k)
    n, k = index_s.shape[-2:]
    out = torch.empty(len(states_t), len(states_s), dtype=torch.float64, device=index_s.device)
    if kind == "cknna":
        kernel_s = torch.stack([s.kernel for s in states_s])
        mutual_s = torch.stack([s.mutual for s in states_s])
        self_s = torch.stack([s.self_similarity for s in states_s])
    for i, t in enumerate(states_t):
        pos, found = _find(index_s, t.index.expand_as(index_s).contiguous())
        if kind == "mutual_knn":
            out[i] = found.sum(dim=(-2, -1)).to(torch.float64) / (n * k)
            continue
        mutual = t.mutual & mutual_s.gather(-1, pos)
        sim = _hsic_masked(found, mutual, t.kernel.expand_as(kernel_s), kernel_s.gather(-1, pos), t.index, n)
        out[i] = sim / (t.self_similarity * self_s).sqrt()
    return out


def _check_k(family: Family, options: dict[str, str], text: str, minimum: int) -> int:
    return family.integer(options, "k", 10, text, minimum)


class MutualKNN(Family):
    """Mutual k-nearest-neighbour alignment (module docstring)."""

    name = "mutual_knn"
    grammar = "mutual_knn[k=K] with K ≥ 1 neighbours"
    examples = ("mutual_knn[k=10]",)
    aliases = {"mutual_knn": "mutual_knn[k=10]"}

    def spec(self, k: int = 10) -> MetricSpec:
        """The spec of one convention."""
        return MetricSpec(f"mutual_knn[k={k}]", self.name, {"k": k}, "higher", (0.0, 1.0), SHAPE_INVARIANCES, True,
                          "rows", f"mutual {k}-NN overlap (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or set(options) - {"k"}:
            raise self.error(text)
        return self.spec(_check_k(self, options, text, 1))

    def compute(self, X: torch.Tensor, Y: torch.Tensor, k: int = 10, center: bool = True) -> torch.Tensor:
        states = [layer_neighbours(X, k, center, name="X (teacher)"),
                  layer_neighbours(Y, k, center, name="Y (student)")]
        return pair_neighbour_values(states[:1], states[1:], "mutual_knn")[0, 0]

    def layer_state(self, X: torch.Tensor, k: int = 10, center: bool = True, **kwargs: Any) -> Any:
        """The layer's neighbour lists."""
        return layer_neighbours(X, k, center)

    def pair_values(self, states_t: Sequence[Any], states_s: Sequence[Any], **kwargs: Any) -> torch.Tensor:
        return pair_neighbour_values(states_t, states_s, "mutual_knn")


class CKNNA(Family):
    """Centred kernel nearest-neighbour alignment (module docstring)."""

    name = "cknna"
    grammar = "cknna[k=K] with K ≥ 2 neighbours"
    examples = ("cknna[k=10]",)
    aliases = {"cknna": "cknna[k=10]"}

    def spec(self, k: int = 10) -> MetricSpec:
        """The spec of one convention."""
        return MetricSpec(f"cknna[k={k}]", self.name, {"k": k}, "higher", (-float("inf"), float("inf")),
                          SHAPE_INVARIANCES, False, "rows", f"CKNNA, {k} neighbours (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or set(options) - {"k"}:
            raise self.error(text)
        return self.spec(_check_k(self, options, text, 2))

    def min_rows(self, **kwargs: Any) -> int:
        return 4

    def compute(self, X: torch.Tensor, Y: torch.Tensor, k: int = 10, center: bool = True) -> torch.Tensor:
        states = [layer_neighbours(X, k, center, True, "X (teacher)"),
                  layer_neighbours(Y, k, center, True, "Y (student)")]
        return pair_neighbour_values(states[:1], states[1:], "cknna")[0, 0]

    def layer_state(self, X: torch.Tensor, k: int = 10, center: bool = True, **kwargs: Any) -> Any:
        """The layer's neighbour lists with its masked self-HSIC."""
        if X.shape[0] < 4:
            raise UserError(f"cknna needs at least 4 samples (rows), got {X.shape[0]}")
        return layer_neighbours(X, k, center, True)

    def pair_values(self, states_t: Sequence[Any], states_s: Sequence[Any], **kwargs: Any) -> torch.Tensor:
        return pair_neighbour_values(states_t, states_s, "cknna")


MUTUAL_KNN = register(MutualKNN())
CKNNA_FAMILY = register(CKNNA())


def mutual_knn(X: ArrayLike, Y: ArrayLike, k: int = 10, center: bool = True) -> float | torch.Tensor:
    """Mutual k-NN overlap of teacher ``X`` (n × p) and student ``Y`` (n × q) (module docstring)."""
    Xt, Yt = as_pair(X, Y)
    return to_output(MUTUAL_KNN.compute(Xt, Yt, int(k), center), X)


def cknna(X: ArrayLike, Y: ArrayLike, k: int = 10, center: bool = True) -> float | torch.Tensor:
    """CKNNA of teacher ``X`` (n × p) and student ``Y`` (n × q) (module docstring)."""
    if int(k) < 2:
        raise UserError(f"cknna needs k ≥ 2, got {k}")
    Xt, Yt = as_pair(X, Y, min_rows=4)
    return to_output(CKNNA_FAMILY.compute(Xt, Yt, int(k), center), X)
