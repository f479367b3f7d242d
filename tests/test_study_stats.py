"""The statistics of a distillation study (repsim.distill.study): the two-way bootstrap against a slow loop and in
simulated studies with a known difference, tests over texts against hand formulas, Holm against its definition,
the geometry–accuracy correlation on relations of known form, and the reader of a study folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from repsim.distill import study
from repsim.system.errors import UserError


def _arms(rng, seeds=6, texts=50, pa=0.7, pb=0.6):
    return rng.random((seeds, texts)) < pa, rng.random((seeds, texts)) < pb


# ---------------------------------------------------------------------------------------------- bootstrap


def test_identical_arms_give_zero_difference_zero_interval_and_p_one():
    a, _ = _arms(np.random.default_rng(0))
    boot = study.bootstrap_difference(a, a.copy(), replicates=500)
    assert (boot["diff"], boot["ci_low"], boot["ci_high"]) == (0.0, 0.0, 0.0)
    test = study.paired_text_test(a, a.copy())
    assert (test["p_t"], test["p_wilcoxon"], test["p_mcnemar"]) == (1.0, 1.0, 1.0)


def test_swapping_the_arms_negates_the_difference_and_mirrors_the_interval():
    a, b = _arms(np.random.default_rng(1))
    ab = study.bootstrap_difference(a, b, replicates=2000, seed=3)
    ba = study.bootstrap_difference(b, a, replicates=2000, seed=3)
    assert ba["diff"] == pytest.approx(-ab["diff"], rel=1e-12)
    assert ba["ci_low"] == pytest.approx(-ab["ci_high"], rel=1e-9, abs=1e-15)
    assert ba["ci_high"] == pytest.approx(-ab["ci_low"], rel=1e-9, abs=1e-15)
    assert ab["ci_low"] < ab["diff"] < ab["ci_high"]
    tests_ab, tests_ba = study.paired_text_test(a, b), study.paired_text_test(b, a)
    assert tests_ba["t"] == pytest.approx(-tests_ab["t"], rel=1e-12)
    assert tests_ba["p_t"] == pytest.approx(tests_ab["p_t"], rel=1e-12)
    assert (tests_ba["a_only"], tests_ba["b_only"]) == (tests_ab["b_only"], tests_ab["a_only"])


def test_vectorised_replicates_equal_a_loop_over_materialised_resamples():
    """w_seedᵀ D w_text / (S·N) = mean(a[rows][:, cols]) − mean(b[rows][:, cols]) for the same draws, also across
    chunk boundaries; the interval is the percentile interval of those loop values."""
    rng = np.random.default_rng(2)
    a, b = _arms(rng, seeds=4, texts=7)
    rows, cols = study.two_way_indices(4, 7, 53, seed=9)
    loop = np.array([a[r][:, c].mean() - b[r][:, c].mean() for r, c in zip(rows, cols, strict=True)])
    fast = study.two_way_replicates(a.astype(float) - b, rows, cols, chunk=10)
    np.testing.assert_allclose(fast, loop, rtol=1e-12, atol=1e-15)
    boot = study.bootstrap_difference(a, b, replicates=53, seed=9)
    np.testing.assert_allclose([boot["ci_low"], boot["ci_high"]], np.quantile(loop, [0.025, 0.975]), rtol=1e-12,
                               atol=1e-15)
    assert boot["se"] == pytest.approx(loop.std(ddof=1), rel=1e-10)


def _probit_study(rng, seeds, texts, tau, sigma, shift):
    """Arm a: P(correct) = Φ(u_j + s_i + shift), arm b: Φ(u_j + s'_i), text effects u ~ N(0, τ²) shared, seed effects
    s, s' ~ N(0, σ²) per arm. Population difference Φ(shift/√(1+τ²+σ²)) − 1/2."""
    u = rng.normal(0, tau, texts)
    a = rng.random((seeds, texts)) < sps.norm.cdf(u + rng.normal(0, sigma, (seeds, 1)) + shift)
    b = rng.random((seeds, texts)) < sps.norm.cdf(u + rng.normal(0, sigma, (seeds, 1)))
    return a, b


def test_interval_covers_the_true_difference_at_its_nominal_rate_when_seed_and_text_effects_dominate():
    """200 simulated studies (20 seeds × 200 texts, strong seed and text effects): the 95 % interval holds the known
    population difference in a share within the 3-sd binomial band around 0.95."""
    rng = np.random.default_rng(4)
    tau, sigma, shift = 1.0, 0.5, 0.3
    truth = sps.norm.cdf(shift / math.sqrt(1 + tau**2 + sigma**2)) - 0.5
    studies = 200
    hits = 0
    for k in range(studies):
        a, b = _probit_study(rng, 20, 200, tau, sigma, shift)
        boot = study.bootstrap_difference(a, b, replicates=400, seed=k)
        hits += boot["ci_low"] <= truth <= boot["ci_high"]
    band = 3 * math.sqrt(0.95 * 0.05 / studies)
    assert 0.95 - band <= hits / studies <= 0.95 + band


def test_bootstrap_variance_is_inflated_by_the_pigeonhole_factor_under_pure_cell_noise():
    """Cells independent with variance σ² and no seed or text effect: Var(mean) = σ²/(S·N), while the two-way
    bootstrap's expected variance is ((2 − 1/S)(2 − 1/N) − 1)·σ²/(S·N) (≈ 3×): the interval is conservative there,
    as the module docstring says."""
    rng = np.random.default_rng(5)
    seeds, texts, p = 20, 200, 0.5
    variances = []
    for k in range(40):
        a, b = rng.random((seeds, texts)) < p, rng.random((seeds, texts)) < p
        variances.append(study.bootstrap_difference(a, b, replicates=2000, seed=k)["se"] ** 2)
    true_variance = 2 * p * (1 - p) / (seeds * texts)
    factor = (2 - 1 / seeds) * (2 - 1 / texts) - 1
    assert np.mean(variances) == pytest.approx(factor * true_variance, rel=0.08)


def test_two_way_variance_is_unbiased_under_the_additive_model():
    """D_ij = a_i + b_j + e_ij (σ_a = 0.3, σ_b = 0.5, σ_e = 1), 10 seeds × 50 texts: the mean of the ANOVA estimate
    over 300 studies is Var(mean D) = σ_a²/S + σ_b²/N + σ_e²/(S·N) = 0.016, where the bootstrap's exceeds it."""
    rng = np.random.default_rng(15)
    seeds, texts = 10, 50
    estimates, bootstrap = [], []
    for k in range(300):
        d = (0.3 * rng.standard_normal((seeds, 1)) + 0.5 * rng.standard_normal((1, texts))
             + rng.standard_normal((seeds, texts)))
        estimates.append(study.two_way_variance(d))
        if k < 40:
            bootstrap.append(study.bootstrap_difference(d, np.zeros_like(d), replicates=1000, seed=k)["se"] ** 2)
    truth = 0.3**2 / seeds + 0.5**2 / texts + 1 / (seeds * texts)
    assert np.mean(estimates) == pytest.approx(truth, rel=0.08)
    assert np.mean(bootstrap) > 1.1 * truth


def test_bootstrap_refuses_mismatched_matrices():
    with pytest.raises(UserError, match="one shape"):
        study.bootstrap_difference(np.ones((3, 4)), np.ones((3, 5)))


# ---------------------------------------------------------------------------------------------- tests over texts


def test_t_test_over_texts_matches_the_hand_formula():
    a, b = _arms(np.random.default_rng(6), seeds=5, texts=80)
    d = a.mean(0) - b.mean(0)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    p = 2 * sps.t.sf(abs(t), d.size - 1)
    out = study.paired_text_test(a, b)
    assert out["t"] == pytest.approx(t, rel=1e-10)
    assert out["p_t"] == pytest.approx(p, rel=1e-8)
    assert out["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)


def test_mcnemar_on_majority_votes_matches_the_exact_binomial_formula():
    """3 seeds; votes built per text: 7 texts only a gets right (2 of 3 seeds), 2 only b, 20 both, 5 neither.
    Exact two-sided McNemar: p = min(1, 2·Σ_{k ≤ 2} C(9, k) / 2⁹)."""
    votes = [(1, 0)] * 7 + [(0, 1)] * 2 + [(1, 1)] * 20 + [(0, 0)] * 5
    pattern = {1: [True, True, False], 0: [False, False, True]}  # majority right / majority wrong
    a = np.array([pattern[va] for va, _ in votes]).T
    b = np.array([pattern[vb] for _, vb in votes]).T
    out = study.paired_text_test(a, b)
    assert (out["a_only"], out["b_only"], out["n_tied"]) == (7, 2, 0)
    expected = min(1.0, 2 * sum(math.comb(9, k) for k in range(3)) / 2**9)
    assert out["p_mcnemar"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_leaves_out_tied_votes():
    """2 seeds, one right and one wrong: no majority, so the text is in neither discordant count."""
    a = np.array([[True, True, True], [False, True, True]])
    b = np.array([[False, False, True], [False, False, True]])
    out = study.paired_text_test(a, b)
    assert (out["n_tied"], out["a_only"], out["b_only"]) == (1, 1, 0)


# ---------------------------------------------------------------------------------------------- Holm


def _holm_by_definition(p):
    """Smallest level α (among the candidates (m − k + 1)·p_(k) and 1) at which Holm's step-down procedure rejects
    each hypothesis: reject p_(1), p_(2), … while (m − k + 1)·p_(k) ≤ α, stop at the first that fails."""
    p = np.asarray(p, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    candidates = sorted({min(1.0, (m - k) * p[i]) for k, i in enumerate(order)} | {1.0})
    out = np.full(p.shape, np.nan)
    for i in ok:
        for alpha in candidates:
            rejected = set()
            for k, j in enumerate(order):
                if (m - k) * p[j] > alpha:
                    break
                rejected.add(j)
            if i in rejected:
                out[i] = alpha
                break
        else:
            out[i] = 1.0
    return out


@given(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.01, 0.05, 1.0, math.nan])), max_size=9))
def test_holm_equals_its_step_down_definition(p):
    np.testing.assert_allclose(study.holm(p), _holm_by_definition(p), rtol=1e-12, atol=0)


def test_holm_on_hand_values():
    np.testing.assert_allclose(study.holm([0.01, 0.04, 0.03, math.nan, 0.5]), [0.04, 0.09, 0.09, math.nan, 0.5],
                               rtol=1e-12)


# ---------------------------------------------------------------------------------------------- comparisons


def test_comparisons_default_pairs_values_and_holm_column():
    rng = np.random.default_rng(7)
    arms = ["ce_only", "none", "projection", "cka", "procrustes", "gram_frobenius"]
    correct = {arm: rng.random((4, 30)) < 0.6 + 0.02 * i for i, arm in enumerate(arms)}
    table = study.comparisons(correct, replicates=300)
    pairs = list(zip(table["arm"], table["baseline"], strict=True))
    assert pairs == [("projection", "none"), ("cka", "none"), ("procrustes", "none"), ("gram_frobenius", "none"),
                     ("none", "ce_only"), ("procrustes", "cka"), ("gram_frobenius", "cka"),
                     ("procrustes", "projection"), ("gram_frobenius", "projection")]
    for row in table.itertuples(index=False):
        a, b = correct[row.arm], correct[row.baseline]
        assert row.diff_pp == pytest.approx(100 * (a.mean() - b.mean()), rel=1e-12, abs=1e-12)
        assert row.p_t == pytest.approx(study.paired_text_test(a, b)["p_t"], rel=1e-12)
    np.testing.assert_allclose(table["p_holm"], study.holm(table["p_t"].to_numpy()), rtol=1e-12)


def test_comparisons_pair_runs_by_seed_number():
    """Arm a has seeds 0, 1, 2 and b seeds 1, 2, 3: only seeds 1 and 2 are compared, row with row."""
    rng = np.random.default_rng(8)
    a, b = rng.random((3, 20)) < 0.5, rng.random((3, 20)) < 0.5
    table = study.comparisons({"a": a, "b": b}, [("a", "b")], seeds={"a": [0, 1, 2], "b": [1, 2, 3]},
                              replicates=200)
    assert table.loc[0, "n_seeds"] == 2
    assert table.loc[0, "diff_pp"] == pytest.approx(100 * (a[1:].mean() - b[:2].mean()), rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------- geometry vs accuracy


def _runs(distance, accuracy, arms):
    return pd.DataFrame({"arm": arms, "d": distance, "accuracy": accuracy})


def test_a_monotone_relation_gives_rho_one_and_the_smallest_p():
    x = np.linspace(0, 1, 12)
    out = study.geometry_predicts_accuracy(_runs(x, np.exp(-3 * x), ["a"] * 12), "d", permutations=999,
                                           replicates=200).set_index("scope")
    assert out.loc["all runs", "rho"] == pytest.approx(-1.0, rel=1e-12)
    assert out.loc["all runs", "p_permutation"] <= 3 / 1000  # 12! orderings: only ρ* = ±1 reach |ρ| = 1
    assert out.loc["within arms", "rho"] == pytest.approx(-1.0, rel=1e-12)


def test_all_runs_rho_is_spearman_and_within_arms_rho_the_mean_of_per_arm_spearmans():
    """Equal arm sizes, no ties: the pooled within-arm statistic = the mean of the per-arm Spearman ρ."""
    rng = np.random.default_rng(10)
    arms = np.repeat(["a", "b", "c"], 8)
    x, y = rng.standard_normal(24), rng.standard_normal(24)
    y = y + 0.5 * x
    out = study.geometry_predicts_accuracy(_runs(x, y, arms), "d", permutations=0, replicates=0).set_index("scope")
    assert out.loc["all runs", "rho"] == pytest.approx(sps.spearmanr(x, y).statistic, rel=1e-12)
    per_arm = [sps.spearmanr(x[arms == g], y[arms == g]).statistic for g in "abc"]
    assert out.loc["within arms", "rho"] == pytest.approx(np.mean(per_arm), rel=1e-12)


def test_independent_noise_gives_roughly_uniform_p_values():
    rng = np.random.default_rng(11)
    ps = []
    for _ in range(40):
        runs = _runs(rng.standard_normal(30), rng.standard_normal(30), np.repeat(["a", "b", "c"], 10))
        ps.append(study.geometry_predicts_accuracy(runs, "d", permutations=300, replicates=0,
                                                   seed=len(ps))["p_permutation"].to_numpy())
    ps = np.array(ps)  # (40, 2): all runs, within arms
    assert np.all((0.3 < ps.mean(0)) & (ps.mean(0) < 0.7))  # uniform: mean 0.5, sd of a mean of 40 ≈ 0.046
    assert np.all((ps < 0.05).mean(0) <= 0.2)


def test_a_relation_confined_to_arm_means_is_seen_over_all_runs_but_not_within_arms():
    rng = np.random.default_rng(12)
    arms = np.repeat(list("abcde"), 20)
    level = {g: i for i, g in enumerate("abcde")}
    shift = np.array([level[g] for g in arms], dtype=float)
    x = 3 * shift + rng.standard_normal(100)
    y = -3 * shift + rng.standard_normal(100)
    out = study.geometry_predicts_accuracy(_runs(x, y, arms), "d", permutations=999, replicates=500)
    out = out.set_index("scope")
    assert out.loc["all runs", "rho"] < -0.8 and out.loc["all runs", "p_permutation"] <= 0.002
    assert abs(out.loc["within arms", "rho"]) < 0.25 and out.loc["within arms", "p_permutation"] > 0.01
    assert out.loc["within arms", "ci_low"] < 0 < out.loc["within arms", "ci_high"]


# ---------------------------------------------------------------------------------------------- reading a study


def _write_run(root, arm, seed, correct, labels=None, index=None, geometry=None, metrics=None):
    folder = root / "runs" / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    n = len(correct)
    labels = np.arange(n) % 2 if labels is None else labels
    index = np.arange(n) if index is None else index
    prediction = np.where(correct, labels, 1 - labels)
    rows = pd.DataFrame({"index": index, "label": labels, "prediction": prediction, "correct": correct})
    rows.iloc[::-1].to_csv(folder / "predictions.csv", index=False)  # any row order
    (folder / "metrics.json").write_text(json.dumps(metrics or {"accuracy": float(np.mean(correct)), "mcc": 0.1}))
    if geometry is not None:
        geometry.to_csv(folder / "geometry.csv", index=False)
    return folder


def _geometry(trained_value, other_value):
    return pd.DataFrame({"teacher_layer": [2, 4, 6], "student_layer": [1, 2, 3], "trained": [True, True, False],
                         "measure": "procrustes[distance]", "value": [trained_value, trained_value + 0.2, other_value],
                         "null_mean": 1.0, "null_sd": 0.1, "z": [-3.0, -1.0, 0.5]})


def test_read_study_gathers_runs_predictions_and_geometry(tmp_path):
    rng = np.random.default_rng(13)
    written = {}
    for arm in ("procrustes", "none"):
        for seed in (2, 0, 1):
            written[arm, seed] = rng.random(9) < 0.6
            _write_run(tmp_path, arm, seed, written[arm, seed], geometry=_geometry(0.1 * seed, 0.9))
    (tmp_path / "runs" / "none" / "seed3").mkdir()  # still training: no predictions yet
    runs, correct, seeds = study.read_study(tmp_path)
    assert list(runs["arm"]) == ["none"] * 3 + ["procrustes"] * 3 and list(runs["seed"]) == [0, 1, 2] * 2
    assert seeds == {"none": [0, 1, 2], "procrustes": [0, 1, 2]}
    for arm in seeds:
        np.testing.assert_array_equal(correct[arm], np.stack([written[arm, s] for s in (0, 1, 2)]))
    row = runs.set_index(["arm", "seed"]).loc[("none", 2)]
    assert row["accuracy"] == pytest.approx(written["none", 2].mean(), rel=1e-12)
    assert row["geometry.procrustes[distance].trained"] == pytest.approx((0.2 + 0.4) / 2, rel=1e-12)
    assert row["geometry.procrustes[distance].trained.z"] == pytest.approx(-2.0, rel=1e-12)
    assert row["geometry.procrustes[distance].untrained"] == pytest.approx(0.9, rel=1e-12)
    assert study.default_distance(runs) == "geometry.procrustes[distance].trained"


def test_read_study_refuses_runs_over_other_texts_or_labels(tmp_path):
    _write_run(tmp_path / "x", "none", 0, np.ones(5, bool))
    _write_run(tmp_path / "x", "cka", 0, np.ones(5, bool), index=np.arange(1, 6))
    with pytest.raises(UserError, match="covers other texts"):
        study.read_study(tmp_path / "x")
    _write_run(tmp_path / "y", "none", 0, np.ones(5, bool))
    _write_run(tmp_path / "y", "cka", 0, np.ones(5, bool), labels=np.array([0, 1, 0, 1, 1]))
    with pytest.raises(UserError, match="other labels"):
        study.read_study(tmp_path / "y")
    with pytest.raises(UserError, match="not a folder"):
        study.read_study(tmp_path / "nothing")
    folder = _write_run(tmp_path / "z", "none", 0, np.ones(5, bool), metrics={"accuracy": 0.5})
    with pytest.raises(UserError, match="disagrees with predictions.csv"):
        study.read_study(tmp_path / "z")
    pd.read_csv(folder / "predictions.csv").drop(columns="correct").to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(UserError, match="missing column.*correct"):
        study.read_study(tmp_path / "z")


def test_write_study_report_writes_the_tables_of_the_functions_and_the_figures(tmp_path):
    rng = np.random.default_rng(14)
    for i, arm in enumerate(("ce_only", "none", "cka", "procrustes")):
        for seed in range(3):
            _write_run(tmp_path, arm, seed, rng.random(40) < 0.5 + 0.05 * i, geometry=_geometry(rng.random(), 1.0))
    paths = study.write_study_report(tmp_path, replicates=200, permutations=99)
    runs, correct, seeds = study.read_study(tmp_path)
    expected = study.comparisons(correct, seeds=seeds, replicates=200)
    pd.testing.assert_frame_equal(pd.read_csv(paths["comparisons"]), expected, check_dtype=False, rtol=1e-9)
    geometry = pd.read_csv(paths["geometry"])
    assert set(geometry["distance"]) == set(study.geometry_columns(runs))
    np.testing.assert_allclose(geometry["p_holm"], study.holm(geometry["p_permutation"].to_numpy()), rtol=1e-12)
    for key in ("accuracy_figure", "geometry_figure"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| procrustes | cka |" in paths["markdown"].read_text()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
