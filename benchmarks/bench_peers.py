"""Every measure family over all layer pairs: repsim.pairwise against each family's reference code looping over pairs.

Workload: 13 teacher layers of width 768 and 7 student layers of width 384 (``bench_pairwise.make_stacks``: float64,
a shared 64-dimensional signal plus noise), 91 pairs, at every n of ``--n``, all in one run.

- repsim: ``repsim.pairwise(teacher, student, metrics=[id])`` for the 91 pairs, one family per call (centring,
  per-layer work and all pairs included); median of ``--repeats`` runs (one run when n > 5000).
- peer: the reference implementation of the people who published the measure (netrep, rsatoolbox, google/svcca,
  platonic-rep), called pair by pair as its documentation does, in a child process of its own (a fresh
  interpreter that rebuilds the same stacks) so that a peer running past ``--peer-seconds`` or out of memory is
  stopped without stopping the run. Pairs are timed one by one in row-major order until all 91 are done or the
  budget is spent; the time of all pairs is the mean per timed pair × 91 (printed as "k of 91 timed"). A peer
  that cannot finish one pair in the budget is reported as skipped. Families no peer implements (Gram-Frobenius,
  the in-sample projection residual) are timed against the plain definition in numpy / scikit-learn's
  ``LinearRegression``, named as such.
- values: on every timed pair the peer's value, mapped to repsim's convention (the mapping is printed beside
  it), is compared with repsim's; the largest difference is printed and a difference above the family's
  tolerance is flagged (``MISMATCH``).

Peers are imported from the environment, or from ``--peers-src DIR`` holding the repositories as
``DIR/google+svcca`` (``cca_core.py``, ``pwcca.py``), ``DIR/minyoungg+platonic-rep`` (``metrics.py``) and
``DIR/ahwillia+netrep`` (the ``netrep`` package); a peer that is missing is skipped with a note. Families repsim
does not have (an id ``get_metric`` refuses) are skipped with a note.

    PYTHONPATH=. python benchmarks/bench_peers.py --peers-src DIR [--n 600 5000 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LT, P, LS, Q = 13, 768, 7, 384
PAIRS = [(t, s) for t in range(LT) for s in range(LS)]


@dataclass(frozen=True)
class Entry:
    """One family: repsim's id, the peer (label, module to import, per-pair call), and the convention mapping."""

    metric: str
    peer: str
    needs: str  # module the peer needs ("" when it is numpy/scikit-learn's plain definition)
    call: str  # name of the per-pair function below
    mapping: str  # how the peer's value is turned into repsim's convention (printed)
    to_repsim: Callable[[float], float]
    tol: float | None  # None: no convention maps the peer's value onto repsim's (the difference is printed)


def _identity(v: float) -> float:
    return v


def _cos(v: float) -> float:
    return math.cos(v)


ENTRIES = [
    Entry("procrustes[angular]", "netrep LinearMetric(alpha=1, score_method='angular')", "netrep", "netrep_shape_1",
          "identical (arccos ρ)", _identity, 1e-9),
    Entry("gram_frobenius", "numpy definition (no peer implements it): ‖K/tr K − L/tr L‖_F, explicit n×n Grams",
          "", "numpy_gram_frobenius", "identical", _identity, 1e-9),
    Entry("cka[linear,biased]", "netrep LinearCKA", "netrep", "netrep_cka", "netrep returns arccos(CKA): cos(value)",
          _cos, 1e-9),
    Entry("projection_residual[in_sample]", "scikit-learn LinearRegression (no peer implements it)", "sklearn",
          "sklearn_residual", "‖X_c − fit‖²/‖X_c‖²", _identity, 1e-9),
    Entry("shape[alpha=0.5]", "netrep LinearMetric(alpha=0.5, score_method='angular')", "netrep", "netrep_shape_half",
          "netrep on X_c/‖X_c‖_F, Y_c/‖Y_c‖_F (its whitening uses the unnormalised scatter XᵀX)", _identity, 1e-8),
    Entry("cca[mean_r]", "svcca cca_core.get_cca_similarity(epsilon=0)", "cca_core", "svcca_cca",
          "np.mean(cca_coef1)", _identity, 1e-8),
    Entry("svcca[k=10]", "svcca tutorial recipe (top-10 SVD directions, get_cca_similarity)", "cca_core",
          "svcca_svcca", "np.mean(cca_coef1)", _identity, 1e-8),
    Entry("pwcca", "svcca pwcca.compute_pwcca(student, teacher) (teacher first raises IndexError)", "pwcca",
          "svcca_pwcca", "none: the peer's weights miss C_xx^{-1/2} and weigh the student (docs/measures.md)",
          _identity, None),
    Entry("rsa[rdm=correlation,compare=spearman]", "rsatoolbox calc_rdm(correlation) + compare(spearman)",
          "rsatoolbox", "rsatoolbox_rsa", "rsatoolbox fed column-centred layers", _identity, 1e-9),
    Entry("mutual_knn[k=10]", "platonic-rep AlignmentMetrics.mutual_knn(topk=10)", "metrics", "platonic_mutual_knn",
          "platonic-rep fed column-centred, row-normalised layers (its pipeline's normalize=True)", _identity, 1e-6),
    Entry("cknna[k=10]", "platonic-rep AlignmentMetrics.cknna(topk=10)", "metrics", "platonic_cknna",
          "as mutual_knn; platonic-rep adds 1e-6 to the denominator (~1e-4 relative on unit rows)", _identity, 1e-3),
]


# ------------------------------------------------------------------------------------------------------------------
# The peers' per-pair calls (x: teacher layer (n, 768), y: student layer (n, 384), float64 numpy)
# ------------------------------------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    return xc / np.linalg.norm(xc)


def netrep_shape_1(x, y):
    from netrep.metrics import LinearMetric

    m = LinearMetric(alpha=1.0, score_method="angular")
    return m.fit(x, y).score(x, y)


def netrep_shape_half(x, y):
    from netrep.metrics import LinearMetric

    x, y = _unit(x), _unit(y)
    m = LinearMetric(alpha=0.5, score_method="angular")
    return m.fit(x, y).score(x, y)


def netrep_cka(x, y):
    from netrep.metrics import LinearCKA

    return LinearCKA().score(x, y)


def numpy_gram_frobenius(x, y):
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    k = xc @ xc.T
    k /= np.trace(k)
    l_ = yc @ yc.T
    l_ /= np.trace(l_)
    k -= l_  # two n × n arrays at a time (in place)
    return float(np.linalg.norm(k))


def sklearn_residual(x, y):
    from sklearn.linear_model import LinearRegression

    xc = x - x.mean(axis=0)
    fit = LinearRegression().fit(y, x).predict(y)
    return float(np.square(x - fit).sum() / np.square(xc).sum())


def svcca_cca(x, y):
    import cca_core

    return float(np.mean(cca_core.get_cca_similarity(x.T, y.T, epsilon=0.0, verbose=False)["cca_coef1"]))


def svcca_svcca(x, y, k=10):
    import cca_core

    def top(a):
        c = a.T - a.T.mean(axis=1, keepdims=True)
        _, s, v = np.linalg.svd(c, full_matrices=False)
        return (s[:k] * np.eye(k)) @ v[:k]

    return float(np.mean(cca_core.get_cca_similarity(top(x), top(y), epsilon=0.0, verbose=False)["cca_coef1"]))


def svcca_pwcca(x, y):
    import pwcca

    return float(pwcca.compute_pwcca(y.T, x.T, epsilon=0.0)[0])


def rsatoolbox_rsa(x, y):
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(compare(calc_rdm(Dataset(x), method="correlation"), calc_rdm(Dataset(y), method="correlation"),
                         method="spearman")[0, 0])


def _unit_rows(x: np.ndarray):
    import torch

    xc = torch.from_numpy(x - x.mean(axis=0))
    return torch.nn.functional.normalize(xc, p=2, dim=-1)


def platonic_mutual_knn(x, y):
    import metrics

    return float(metrics.AlignmentMetrics.mutual_knn(_unit_rows(x), _unit_rows(y), topk=10))


def platonic_cknna(x, y):
    import metrics

    return float(metrics.AlignmentMetrics.cknna(_unit_rows(x), _unit_rows(y), topk=10))


# ------------------------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Set torch's and every loaded BLAS library's threads (call after the imports that load BLAS libraries:
    scipy and scikit-learn bring their own OpenBLAS)."""
    import scipy.linalg  # noqa: F401
    import torch

    if threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)
    return torch.get_num_threads()


def add_peer_paths(peers_src: str | None) -> None:
    """Make the peers in ``peers_src`` importable (platonic-rep's metrics.py imports torchaudio, which only its
    edit-distance measure uses: a stub stands in when torchaudio is absent)."""
    if peers_src:
        for name in ("google+svcca", "minyoungg+platonic-rep", "ahwillia+netrep"):
            path = os.path.join(peers_src, name)
            if os.path.isdir(path) and path not in sys.path:
                sys.path.append(path)
    try:
        importlib.import_module("torchaudio")
    except ImportError:
        stub = types.ModuleType("torchaudio")
        stub.functional = types.ModuleType("torchaudio.functional")
        sys.modules["torchaudio"], sys.modules["torchaudio.functional"] = stub, stub.functional


def stacks(n: int):
    import torch

    sys.path.insert(0, HERE)
    from bench_pairwise import make_stacks

    return make_stacks(n, LT, P, LS, Q, torch.device("cpu"))


def _limit_memory(gib: float) -> None:
    """Cap this process's address space, so that running out of memory is an error here, not the machine's."""
    import resource

    cap = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:200]


def child(kind: str, entry: Entry, n: int, args, out) -> None:
    """A fresh process: rebuild the stacks, then either time repsim (``kind`` "repsim": ("time", values, seconds)
    per run) or run the peer pair by pair (("pair", (t, s, value), seconds) per pair)."""
    try:
        _limit_memory(args.memory_gib)
        add_peer_paths(args.peers_src)
        if kind == "peer" and entry.needs:
            importlib.import_module(entry.needs)
        from repsim.measures.allpairs import pairwise
        from repsim.system.errors import UserError

        set_threads(args.threads)
        teacher, student = stacks(n)
        if kind == "repsim":
            pairwise(teacher[:1], student[:1], metrics=["cka"])  # warm-up (imports, thread pool)
            out.put(("ready", None, None))
            for _ in range(args.repeats if n <= 5000 else 1):
                t0 = time.perf_counter()
                try:
                    values = pairwise(teacher, student, metrics=[entry.metric])
                except UserError as exc:
                    out.put(("error", "refused: " + _error_text(exc).split(": ", 1)[1], None))
                    break
                out.put(("time", next(iter(values.values())), time.perf_counter() - t0))
        else:
            teacher = [t.numpy() for t in teacher]
            student = [s.numpy() for s in student]
            fn = globals()[entry.call]
            out.put(("ready", None, None))
            for t, s in PAIRS:
                t0 = time.perf_counter()
                value = fn(teacher[t], student[s])
                out.put(("pair", (t, s, float(value)), time.perf_counter() - t0))
    except BaseException as exc:  # reported by the parent
        out.put(("error", _error_text(exc), None))
    out.put(("done", None, None))


def run_child(kind: str, entry: Entry, n: int, args, budget: float) -> tuple[list, str | None]:
    """The child's reports until it is done or ``budget`` seconds after its stacks are built; then it is stopped."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=child, args=(kind, entry, n, args, out), daemon=True)
    proc.start()
    got, error, started = [], None, None
    setup_deadline = time.monotonic() + 900
    while True:
        limit = (started + budget if started else setup_deadline) - time.monotonic()
        try:
            tag, value, seconds = out.get(timeout=max(0.1, limit))
        except queue.Empty:
            if not proc.is_alive():
                error = error or f"process ended (exit code {proc.exitcode})"
                break
            if limit <= 0.1:
                error = error or f"stopped after the {budget:.0f} s budget"
                break
            continue
        if tag == "ready":
            started = time.monotonic()
        elif tag == "error":
            error = value
        elif tag == "done":
            break
        else:
            got.append((value, seconds))
    if proc.is_alive():
        proc.kill()
    proc.join()
    return got, error


def missing_peer(entry: Entry, peers_src: str | None) -> str | None:
    if not entry.needs:
        return None
    add_peer_paths(peers_src)
    try:
        importlib.import_module(entry.needs)
    except Exception as exc:  # an absent or broken peer is reported and skipped
        return f"{entry.needs} not importable ({type(exc).__name__}); pass --peers-src or install it"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[600, 5000, 20000])
    ap.add_argument("--threads", type=int, default=None, help="torch and BLAS threads, repsim and peers alike")
    ap.add_argument("--repeats", type=int, default=3, help="repsim runs per family at n ≤ 5000 (median)")
    ap.add_argument("--peer-seconds", type=float, default=60.0,
                    help="wall-clock budget of each peer at each n (pairs timed until it is spent)")
    ap.add_argument("--peers-src", default=None, help="folder holding the peers' repositories (see the docstring)")
    ap.add_argument("--only", nargs="*", default=None, help="family ids to run (default: every entry)")
    ap.add_argument("--repsim-seconds", type=float, default=900.0, help="wall-clock budget of repsim per family and n")
    ap.add_argument("--memory-gib", type=float, default=10.0,
                    help="address-space cap of every measuring process (running out is reported, not fatal)")
    args = ap.parse_args()

    try:
        from repsim.measures.registry import get_metric
    except ImportError:  # before the registry module
        from repsim.measures.functions import get_metric
    from repsim.system.errors import UserError

    entries = [e for e in ENTRIES if not args.only or e.metric in args.only]
    available, notes = [], []
    for e in entries:
        try:
            get_metric(e.metric)
        except UserError:
            notes.append(f"  {e.metric}: not in this repsim, skipped")
            continue
        note = missing_peer(e, args.peers_src)
        if note:
            notes.append(f"  {e.metric}: peer {note}, skipped")
        available.append((e, note))
    threads = set_threads(args.threads)  # after the peers' imports, which load their own BLAS libraries
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {threads} torch/BLAS threads; stacks {LT}×{P} vs "
          f"{LS}×{Q} ({len(PAIRS)} pairs), float64; peer budget {args.peer_seconds:.0f} s per family and n")
    print("\n".join(notes))
    rows = []
    for n in args.n:
        for e, note in available:
            runs, refused = run_child("repsim", e, n, args, args.repsim_seconds)
            values = runs[-1][0] if runs else None
            line = {"n": n, "metric": e.metric, "peer": e.peer, "refused": refused if not runs else None,
                    "ours": statistics.median(sec for _, sec in runs) if runs else None, "runs": len(runs)}
            if note is None:
                timed, error = run_child("peer", e, n, args, args.peer_seconds)
                k = len(timed)
                line.update(k=k, error=error)
                if k:
                    line["peer_all"] = sum(sec for _, sec in timed) / k * len(PAIRS)
                    if values is not None:
                        diffs = [abs(e.to_repsim(v) - values[t, s]) for (t, s, v), _ in timed]
                        line["diff"] = max(diffs) if all(math.isfinite(d) for d in diffs) else float("nan")
                if not k and error and error.startswith("stopped after"):  # one pair takes longer than the budget
                    line["peer_above"] = args.peer_seconds * len(PAIRS)
            else:
                line["error"] = note
            rows.append(line)
            report(line, e)
    print("\nsummary (peer time for all 91 pairs / repsim time; > 1: repsim faster)")
    for line in rows:
        peer, ours = line.get("peer_all") or line.get("peer_above"), line["ours"]
        ratio = f"{peer / ours:.1f}×" if peer and ours else "—"
        if line.get("peer_above"):  # no pair finished in the budget: a lower bound
            ratio, peer_text = f"> {ratio}" if ours else "—", f"> {line['peer_above']:.0f} s"
        else:
            peer_text = fmt(peer).strip()
        print(f"  n={line['n']:>6} {line['metric']:<40} repsim {fmt(ours)}  peer {peer_text:>12} "
              f"({line.get('k', 0)} of {len(PAIRS)} pairs timed)  peer/repsim {ratio}")


def fmt(seconds: float | None) -> str:
    return f"{seconds:9.3f} s" if seconds is not None else "        —"


def report(line: dict, e: Entry) -> None:
    diff = line.get("diff")
    flag = "" if diff is None or e.tol is None else ("  MISMATCH" if not diff <= e.tol else "")
    print(f"n={line['n']} {line['metric']}: repsim {fmt(line['ours'])}"
          + (f" (median of {line['runs']})" if line["runs"] > 1 else "")
          + (f" ({line['refused']})" if line["refused"] else ""))
    if line.get("error") and not line.get("k"):
        print(f"    peer {e.peer}: skipped ({line['error']})")
        return
    print(f"    peer {e.peer}: {fmt(line.get('peer_all'))} for {len(PAIRS)} pairs ({line.get('k', 0)} timed, "
          f"scaled ×{len(PAIRS)}/{line.get('k', 0)})" + (f"; stopped: {line['error']}" if line.get("error") else ""))
    if diff is not None:
        print(f"    values: max |peer→repsim − repsim| = {diff:.1e} on the timed pairs ({e.mapping}){flag}")


if __name__ == "__main__":
    main()
