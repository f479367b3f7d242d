"""Representational similarity analysis (Kriegeskorte, Mur & Bandettini 2008; rsatoolbox's conventions):
``rsa[rdm=R,compare=C]``, R ∈ {correlation, euclidean, cosine}, C ∈ {spearman, pearson, kendall_a, cosine}.

Each side is prepared by the shared rule (columns centred, unit Frobenius norm), then summarised by its
representational dissimilarity matrix over the n stimuli (rows), of which the upper triangle (i < j, row-major,
m = n(n − 1)/2 entries) is kept:

- ``correlation``: 1 − Pearson r of rows i and j (each row centred across its features);
- ``euclidean``: the squared Euclidean distance ‖xᵢ − xⱼ‖² (rsatoolbox's "euclidean" RDM, which also divides by
  the width; no comparison below sees a common factor);
- ``cosine``: 1 − cos(xᵢ, xⱼ) (not offered by rsatoolbox 0.3.2).

The two RDM vectors are compared by ``spearman`` (Pearson r of their ranks, ties sharing their mean rank),
``pearson``, ``kendall_a`` ((concordant − discordant)/(m(m − 1)/2), ties counting neither way) or ``cosine``
(uncentred); the value lies in [−1, 1], higher = more similar, symmetric. Invariant to translation (the columns are
centred), isotropic scaling and permutations of either side; the euclidean and cosine RDMs also to orthogonal maps
(they are functions of the inner products), the correlation RDM not (centring a row across features is not
preserved by a rotation of the features). A row with zero norm (correlation: zero spread across features) has no
correlation or cosine RDM entry: UserError.

Cost: each layer's RDM vector (m float64, 8·m bytes: 1.4 MB at n = 600, 100 MB at n = 5000, 1.6 GB at n = 20000)
and its ranks are computed once per layer (O(n²·width) from row blocks of the Gram matrix, ranks O(m log m) by
one sort). Over all layer pairs the L_s student vectors are kept and the teacher vectors built one at a time, so
the peak is about 8·m·(L_s + 6) bytes (:func:`rsa_memory_bytes`; UserError naming the estimate beyond the
available memory); spearman, pearson and cosine are dot products of standardised vectors. kendall_a counts
discordant pairs in O(m log m) per layer pair (scipy's merge-sort count).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from repsim.measures.arrays import ArrayLike, as_pair, prepare, to_output
from repsim.measures.registry import SHAPE_INVARIANCES, Family, MetricSpec, register
from repsim.system.errors import UserError

RDMS = ("correlation", "euclidean", "cosine")
COMPARES = ("spearman", "pearson", "kendall_a", "cosine")
#: entries of the Gram matrix formed at once when building an RDM (bounds the temporary memory to 32 MB)
BLOCK_ENTRIES = 1 << 22


def _unit_rows(X: torch.Tensor, centre_rows: bool, name: str, rdm: str) -> torch.Tensor:
    """Rows scaled to unit length (centred across features first for the correlation RDM); UserError for a row
    whose length is rounding noise (≤ 16·√p·eps times its largest entry before centring)."""
    size = X.abs().amax(dim=1)
    if centre_rows:
        X = X - X.mean(dim=1, keepdim=True)
    norms = X.norm(dim=1)
    flat = ~(norms > 16 * math.sqrt(X.shape[1]) * torch.finfo(X.dtype).eps * size)
    if bool(flat.any()):
        row = int(torch.nonzero(flat)[0])
        raise UserError(f"row {row} of {name} has no {'spread across features' if centre_rows else 'length'} "
                        f"after centring: its {rdm} dissimilarities are undefined (use rdm=euclidean)")
    return X / norms[:, None]


def rdm_vector(X: torch.Tensor, rdm: str, name: str = "X") -> torch.Tensor:
    """The upper triangle (i < j, row-major) of the RDM of the rows of a prepared side X (n × p), float64 (m,)."""
    n = X.shape[0]
    if rdm == "euclidean":
        sq = X.square().sum(dim=1)
        rows = X
    else:
        rows = _unit_rows(X, rdm == "correlation", name, rdm)
    out = X.new_empty(n * (n - 1) // 2)
    step = max(1, BLOCK_ENTRIES // max(n, 1))
    offset = 0
    for lo in range(0, n - 1, step):
        hi = min(n - 1, lo + step)
        G = rows[lo:hi] @ rows[lo:].T  # rows lo…hi−1 against lo…n−1
        if rdm == "euclidean":
            D = (sq[lo:hi, None] + sq[None, lo:] - 2 * G).clamp_min(0)
        else:
            D = 1 - G
        i, j = torch.triu_indices(hi - lo, n - lo, 1, device=X.device)
        block = D[i, j]
        out[offset:offset + block.numel()] = block
        offset += block.numel()
    return out


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1 … m of v's entries, tied entries sharing the mean of their ranks (scipy's ``rankdata``).

    One unstable sort: equal values are compared exactly, and each run of equal sorted values gets the mean of
    its positions, so the order within a run does not matter."""
    sorted_v, order = torch.sort(v)
    _, counts = torch.unique_consecutive(sorted_v, return_counts=True)
    del sorted_v
    group_rank = counts.cumsum(0).to(v.dtype)  # 1-based rank of each group's last member
    group_rank -= (counts.to(v.dtype) - 1) / 2
    ranks = torch.empty_like(v)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def _standardised(v: torch.Tensor, centre: bool, what: str) -> torch.Tensor:
    if centre:
        v = v - v.mean()
    norm = v.norm()
    if not float(norm) > 0:
        raise UserError(f"the RDM of {what} is constant: its {'correlation' if centre else 'cosine'} with another "
                        "RDM is undefined")
    return v / norm


class KendallState:
    """An RDM vector (numpy) with its tied-pair count Σ t(t − 1)/2 over groups of equal entries."""

    def __init__(self, v: torch.Tensor) -> None:
        self.values = v.detach().cpu().numpy()
        _, counts = np.unique(self.values, return_counts=True)
        self.ties = int((counts.astype(np.int64) * (counts.astype(np.int64) - 1) // 2).sum())
        self.device = v.device


def kendall_tau_a(x: KendallState, y: KendallState) -> float:
    """(C − D)/N₀, N₀ = m(m − 1)/2, from scipy's τ_b = (C − D)/√((N₀ − T_x)(N₀ − T_y)) (T the tied pairs)."""
    m = x.values.size
    total = m * (m - 1) // 2
    if x.ties == total or y.ties == total:
        raise UserError("an RDM is constant: Kendall's tau with another RDM is undefined")
    tau_b = kendalltau(x.values, y.values, variant="b", method="asymptotic").statistic
    return float(tau_b) * math.sqrt(total - x.ties) * math.sqrt(total - y.ties) / total


def available_bytes(device: torch.device) -> int:
    """Bytes a computation may allocate now: free memory of a CUDA device, else the host's available memory
    (``MemAvailable`` of /proc/meminfo, or free pages × page size where that file is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


#: m-entry float64 vectors alive while one layer's RDM is ranked (RDM, sorted values, permutation, run lengths,
#: run ranks, ranks) beyond the layers already held
WORKING_VECTORS = 6


def rsa_memory_bytes(n: int, student_layers: int) -> int:
    """Peak bytes of the RDM vectors of all layer pairs: the ``student_layers`` kept vectors plus the one being
    built, 8·m·(student_layers + WORKING_VECTORS) with m = n(n − 1)/2."""
    return 8 * (n * (n - 1) // 2) * (student_layers + WORKING_VECTORS)


class LayerRows:
    """A layer's prepared rows, from which its RDM vector is built only when :meth:`RSA.pair_values` needs it
    (the student layers' vectors are kept, the teacher layers' built one at a time)."""

    def __init__(self, X: torch.Tensor, name: str) -> None:
        self.X, self.name = X, name


class RSA(Family):
    """Representational similarity analysis (module docstring)."""

    name = "rsa"
    grammar = ("rsa[rdm=R,compare=C] with R one of " + ", ".join(RDMS) + " and C one of " + ", ".join(COMPARES))
    examples = ("rsa[rdm=correlation,compare=spearman]", "rsa[rdm=euclidean,compare=pearson]",
                "rsa[rdm=cosine,compare=kendall_a]", "rsa[rdm=euclidean,compare=cosine]")
    aliases = {"rsa": "rsa[rdm=correlation,compare=spearman]"}

    def spec(self, rdm: str = "correlation", compare: str = "spearman") -> MetricSpec:
        """The spec of one convention."""
        invariances = SHAPE_INVARIANCES if rdm != "correlation" else SHAPE_INVARIANCES - {"orthogonal"}
        names = {"spearman": "Spearman ρ", "pearson": "Pearson r", "kendall_a": "Kendall τ_a", "cosine": "cosine"}
        rdms = {"correlation": "1−correlation", "euclidean": "squared Euclidean", "cosine": "1−cosine"}
        return MetricSpec(f"rsa[rdm={rdm},compare={compare}]", self.name, {"rdm": rdm, "compare": compare}, "higher",
                          (-1.0, 1.0), frozenset(invariances), True, "rows",
                          f"RSA: {names[compare]} of {rdms[rdm]} RDMs (higher = more similar)")

    def parse(self, flags: list[str], options: dict[str, str], text: str) -> MetricSpec:
        if flags or set(options) - {"rdm", "compare"}:
            raise self.error(text)
        rdm, compare = options.get("rdm", "correlation"), options.get("compare", "spearman")
        if rdm not in RDMS or compare not in COMPARES:
            raise self.error(text)
        return self.spec(rdm, compare)

    def min_rows(self, **kwargs: Any) -> int:
        return 3

    def compute(self, X: torch.Tensor, Y: torch.Tensor, rdm: str = "correlation", compare: str = "spearman",
                center: bool = True) -> torch.Tensor:
        states = [self.layer_state(A, rdm=rdm, compare=compare, center=center, name=name)
                  for A, name in ((X, "X (teacher)"), (Y, "Y (student)"))]
        return self.pair_values(states[:1], states[1:], rdm=rdm, compare=compare)[0, 0]

    def layer_state(self, X: torch.Tensor, rdm: str = "correlation", compare: str = "spearman",
                    center: bool = True, name: str = "X", **kwargs: Any) -> Any:
        """The layer's prepared rows (:class:`LayerRows`); its RDM vector is built by :meth:`pair_values`."""
        if X.shape[0] < 3:
            raise UserError(f"RSA needs at least 3 samples (rows), got {X.shape[0]}")
        return LayerRows(prepare(X, center, name), name)

    @staticmethod
    def rdm_state(layer: LayerRows, rdm: str, compare: str) -> Any:
        """The layer's RDM vector, standardised for its comparison (ranks for spearman, centred for pearson,
        unit norm for pearson, spearman and cosine), or its values with tie count for kendall_a."""
        v = rdm_vector(layer.X, rdm, layer.name)
        if compare == "kendall_a":
            return KendallState(v)
        if compare == "spearman":
            v = average_ranks(v)
        return _standardised(v, compare != "cosine", layer.name)

    def pair_values(self, states_t: Sequence[Any], states_s: Sequence[Any], rdm: str = "correlation",
                    compare: str = "spearman", **kwargs: Any) -> torch.Tensor:
        """All layer pairs: the student layers' RDM states are built and kept, then each teacher layer's is built,
        compared with them and dropped. UserError when the estimate :func:`rsa_memory_bytes` exceeds the
        available memory."""
        n, device = states_t[0].X.shape[0], states_t[0].X.device
        need = rsa_memory_bytes(n, len(states_s))
        have = available_bytes(device)
        if need > have:
            raise UserError(f"rsa[rdm={rdm},compare={compare}] on {n} rows keeps {len(states_s)} student RDMs of "
                            f"{n * (n - 1) // 2} entries: about {need / 2**30:.1f} GiB, more than the "
                            f"{have / 2**30:.1f} GiB available; use fewer rows (max_samples)")
        kept = [self.rdm_state(y, rdm, compare) for y in states_s]
        out = torch.empty(len(states_t), len(states_s), dtype=torch.float64)
        for i, x in enumerate(states_t):
            vx = self.rdm_state(x, rdm, compare)
            for j, vy in enumerate(kept):
                out[i, j] = kendall_tau_a(vx, vy) if compare == "kendall_a" else float(vx @ vy)
            del vx
        return out.clamp(-1.0, 1.0).to(device)


FAMILY = register(RSA())


def rsa(X: ArrayLike, Y: ArrayLike, rdm: str = "correlation", compare: str = "spearman",
        center: bool = True) -> float | torch.Tensor:
    """RSA of teacher ``X`` (n × p) and student ``Y`` (n × q): the ``compare`` correlation of their ``rdm`` RDMs
    (module docstring); higher is more similar."""
    spec = FAMILY.parse([], {"rdm": str(rdm), "compare": str(compare)}, f"rsa[rdm={rdm},compare={compare}]")
    Xt, Yt = as_pair(X, Y, min_rows=3)
    return to_output(FAMILY.compute(Xt, Yt, center=center, **spec.kwargs), X)
