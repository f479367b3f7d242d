"""The geometry check (repsim.theory.check, `repsim check`): angles and verdicts on cases with known answers."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape
from tiny_models import WORDS

import repsim.theory as theory
from repsim import cli
from repsim.measures import functions as metrics
from repsim.system.errors import UserError


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def _slow_angle_stats(T, S, eps):
    """Independent double loop over pairs: centred cosines, ε-orthogonal counts, angle distortions (degrees)."""
    Tc, Sc = T - T.mean(0), S - S.mean(0)
    n = len(T)
    orth = kept = 0
    dist = []
    for i in range(n):
        for j in range(i + 1, n):
            ct = Tc[i] @ Tc[j] / (np.linalg.norm(Tc[i]) * np.linalg.norm(Tc[j]))
            cs = Sc[i] @ Sc[j] / (np.linalg.norm(Sc[i]) * np.linalg.norm(Sc[j]))
            ct, cs = min(1.0, max(-1.0, ct)), min(1.0, max(-1.0, cs))
            if abs(ct) <= eps:
                orth += 1
                kept += abs(cs) <= eps
            dist.append(abs(math.degrees(math.acos(ct)) - math.degrees(math.acos(cs))))
    return orth, kept, np.array(dist)


def test_check_matches_slow_pairwise_formulas():
    rng = np.random.default_rng(0)
    T = rng.standard_normal((40, 12))
    S = T[:, :5] @ rng.standard_normal((5, 6)) + 0.3 * rng.standard_normal((40, 6))
    res = theory.check(T, S, eps=0.2)
    orth, kept, dist = _slow_angle_stats(T, S, 0.2)
    assert (res.teacher_orthogonal_pairs, res.preserved_pairs) == (orth, kept)
    assert res.preserved_fraction == pytest.approx(kept / orth, abs=0)
    assert res.angle_distortion_deg["q50"] == pytest.approx(np.quantile(dist, 0.5), rel=1e-9, abs=1e-9)
    assert res.angle_distortion_deg["q90"] == pytest.approx(np.quantile(dist, 0.9), rel=1e-9, abs=1e-9)
    assert res.angle_distortion_deg["max"] == pytest.approx(dist.max(), rel=1e-9, abs=1e-9)
    assert res.metrics["procrustes[distance]"] == pytest.approx(metrics.procrustes(T, S), rel=1e-12, abs=1e-12)
    assert res.metrics["cka[linear,biased]"] == pytest.approx(metrics.cka(T, S), rel=1e-12, abs=1e-12)
    assert res.metrics["projection_residual[folds=5]"] == pytest.approx(
        metrics.projection_residual(T, S, folds=5), rel=1e-12, abs=1e-12)
    assert res.max_inner_product_error <= res.metrics["gram_frobenius"] + 1e-12
    ct, cs = _slow_cosines(T, S)
    t_orth = {k for k, c in enumerate(ct) if abs(c) <= 0.2}
    s_orth = {k for k, c in enumerate(cs) if abs(c) <= 0.2}
    assert res.student_orthogonal_pairs == len(s_orth)
    assert res.jaccard == pytest.approx(len(t_orth & s_orth) / len(t_orth | s_orth), abs=0)
    assert res.cosine_correlation == pytest.approx(np.corrcoef(ct, cs)[0, 1], rel=1e-9)
    assert res.angle_distortion_deg["q99"] == pytest.approx(np.quantile(dist, 0.99), rel=1e-9, abs=1e-9)


def _slow_cosines(T, S):
    """Cosines of centred rows over the pairs i < j, teacher and student, by a double loop."""
    Tc, Sc = T - T.mean(0), S - S.mean(0)
    ct, cs = [], []
    for i in range(len(T)):
        for j in range(i + 1, len(T)):
            ct.append(Tc[i] @ Tc[j] / (np.linalg.norm(Tc[i]) * np.linalg.norm(Tc[j])))
            cs.append(Sc[i] @ Sc[j] / (np.linalg.norm(Sc[i]) * np.linalg.norm(Sc[j])))
    return np.clip(ct, -1, 1), np.clip(cs, -1, 1)


def test_null_is_the_explicit_shuffles():
    """Chance level, spread, p-value and z of a diagnostic equal those recomputed by hand over the documented
    shuffles (permutation_indices with seed + 1): for Procrustes through the metric, for the ε-orthogonal Jaccard
    and the cosine correlation through the slow double loop."""
    from repsim.analysis.stats import permutation_indices

    rng = np.random.default_rng(5)
    T = rng.standard_normal((24, 6))
    S = T[:, :3] @ rng.standard_normal((3, 4)) + 0.8 * rng.standard_normal((24, 4))
    P = 15
    res = theory.check(T, S, eps=0.2, permutations=P, seed=2)
    perms = permutation_indices(24, P, seed=3)
    ct, _ = _slow_cosines(T, S)

    def jaccard(Sp):
        _, cs = _slow_cosines(T, Sp)
        a, b = np.abs(ct) <= 0.2, np.abs(cs) <= 0.2
        return (a & b).sum() / (a | b).sum()

    nulls = {"procrustes[distance]": ([metrics.procrustes(T, S[p]) for p in perms], "lower"),
             "eps_orthogonal_jaccard": ([jaccard(S[p]) for p in perms], "higher"),
             "cosine_correlation": ([np.corrcoef(ct, _slow_cosines(T, S[p])[1])[0, 1] for p in perms], "higher")}
    for name, (null, direction) in nulls.items():
        null = np.array(null)
        value = res.diagnostics()[name]
        hits = (null <= value + 1e-12) if direction == "lower" else (null >= value - 1e-12)
        sd = null.std(ddof=1)
        gain = value - null.mean() if direction == "higher" else null.mean() - value
        assert res.chance[name] == pytest.approx(null.mean(), rel=1e-9), name
        assert res.chance_sd[name] == pytest.approx(sd, rel=1e-6), name
        assert res.p_value[name] == pytest.approx((1 + hits.sum()) / (P + 1), abs=0), name
        assert res.z[name] == pytest.approx(gain / sd, rel=1e-6), name


def test_orthogonal_copy_is_perfect_and_beats_every_shuffle():
    rng = np.random.default_rng(6)
    T = rng.standard_normal((60, 10))
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    P = 30
    res = theory.check(T, 2.5 * T @ Q - 4.0, permutations=P)
    assert res.jaccard == 1.0 and res.preserved_fraction == 1.0
    assert res.cosine_correlation == pytest.approx(1.0, abs=1e-12)
    assert res.angle_distortion_deg["q99"] < 1e-5
    table = res.against_chance()
    assert set(table.diagnostic) == set(res.metrics) | set(theory.checks.PAIR_DIAGNOSTICS)
    assert (table.p_value == 1 / (P + 1)).all()  # the smallest a permutation p-value can be
    assert (table.z > 3).all()


def test_row_shuffled_copy_is_at_chance():
    """A copy of the teacher with its rows shuffled is one more draw from the null: every diagnostic stays within
    a few standard deviations of its chance level, and none reaches the smallest p-value."""
    rng = np.random.default_rng(7)
    T = rng.standard_normal((120, 16))
    P = 60
    res = theory.check(T, T[rng.permutation(120)], permutations=P)
    table = res.against_chance()
    assert (table.z.abs() < 4).all(), table
    assert (table.p_value > 1 / (P + 1)).all(), table
    assert not res.flagged and res.verdict.startswith("CKA says dissimilar")


def test_related_noisy_copy_lies_between_chance_and_perfect():
    """Student = a linear image of the teacher plus noise: every diagnostic is better than chance, worse than an
    exact copy, and worse with more noise; with little noise it beats every shuffle."""
    rng = np.random.default_rng(8)
    T = rng.standard_normal((150, 12))
    A = rng.standard_normal((12, 12))
    noise = rng.standard_normal((150, 12))
    P = 40
    perfect = theory.check(T, T, permutations=P).diagnostics()
    checks = [theory.check(T, T @ A + s * noise, permutations=P) for s in (1.0, 4.0)]
    similar = checks[0].against_chance().set_index("diagnostic")["similar"]
    for name in ("procrustes[distance]", "gram_frobenius", "cka[linear,biased]", "eps_orthogonal_jaccard",
                 "cosine_correlation", "angle_distortion_deg_q50", "angle_distortion_deg_q90",
                 "angle_distortion_deg_q99"):
        sign = 1 if similar[name] == "higher" else -1
        less, more = (sign * c.diagnostics()[name] for c in checks)
        assert sign * checks[1].chance[name] < more < less < sign * perfect[name], name
        assert checks[0].p_value[name] == 1 / (P + 1), name
        assert checks[1].z[name] > 0, name


def test_eps_orthogonality_is_symmetric():
    """A student whose every pair is ε-orthogonal keeps all of the teacher's ε-orthogonal pairs (the one-sided
    fraction is 1, and so it is for every shuffle: no better than chance), while the Jaccard overlap counts the
    pairs it made orthogonal: |A| / all pairs."""
    rng = np.random.default_rng(9)
    T = rng.standard_normal((40, 3))
    S = np.eye(40)  # centred rows: every cosine is −1/39
    res = theory.check(T, S, eps=0.1, permutations=20)
    pairs = 40 * 39 // 2
    assert res.student_orthogonal_pairs == pairs and 0 < res.teacher_orthogonal_pairs < pairs
    assert res.preserved_fraction == 1.0 and res.p_value["preserved_fraction"] == 1.0
    assert res.z["preserved_fraction"] == 0.0
    assert res.jaccard == pytest.approx(res.teacher_orthogonal_pairs / pairs, abs=0)


def test_permutations_must_be_a_count():
    with pytest.raises(UserError, match="permutations"):
        theory.check(np.eye(10), np.eye(10), permutations=-1)
    with pytest.raises(UserError, match="permutations"):
        theory.check_models("no-such-model", "no-such-model", ["a"] * 10, permutations=True)
    assert cli.build_parser().parse_args(["check", "t", "s", "--chance-permutations", "7"]).permutations == 7
    with pytest.warns(DeprecationWarning):
        old = theory.check(np.eye(10), np.eye(10)[::-1], chance_permutations=3, projection_folds=None)
    assert old.permutations == 3


def test_check_flags_theorem1_near_orthogonal_student():
    """Theorem-1 teacher with m = 4 near-orthogonal rows (ε = 3, n = 200): CKA 0.992, yet the 4 teacher pairs with
    |cos| = 0.1 collapse to |cos| = 1 in the student: flagged."""
    th = theory.theorem1(200, 4, 3.0, d_s=2)
    res = theory.check(th.teacher, th.student, eps=0.15, permutations=20)
    assert res.metrics["cka[linear,biased]"] > 0.99
    assert res.teacher_orthogonal_pairs == 4 and res.preserved_pairs == 0 and res.preserved_fraction == 0.0
    assert res.flagged and res.verdict.startswith("CKA says similar")
    assert res.angle_distortion_deg["max"] == pytest.approx(math.degrees(math.acos(0.1)), rel=1e-9, abs=1e-9)


def test_check_flags_on_procrustes_alone():
    th = theory.theorem1(256, 256, 1.0)  # the sweep point m = n = 256: CKA 0.996, Procrustes 0.762
    res = theory.check(th.teacher, th.student, eps=0.05, procrustes_threshold=0.5, permutations=20)
    assert res.flagged and "Procrustes" in res.verdict
    relaxed = theory.check(th.teacher, th.student, eps=0.05, procrustes_threshold=0.8, permutations=20)
    assert not relaxed.flagged  # no teacher pair is ε-orthogonal here: only the Procrustes criterion could fire
    assert relaxed.teacher_orthogonal_pairs == 0 and math.isnan(relaxed.preserved_fraction)


def test_check_thresholds_are_fractions_of_the_way_to_chance():
    """The chance levels are the means over the documented seeded student-row permutations, and the Procrustes
    criterion flips exactly where the threshold crosses d / d_chance (not at a fixed distance)."""
    from repsim.analysis.stats import permutation_indices

    th = theory.theorem1(256, 256, 1.0)
    res = theory.check(th.teacher, th.student, eps=0.05, seed=3, permutations=3)
    perms = permutation_indices(256, 3, seed=4)
    expected = np.mean([metrics.procrustes(th.teacher, th.student[p]) for p in perms])
    assert res.chance["procrustes[distance]"] == pytest.approx(expected, rel=1e-12)
    assert res.chance["cka[linear,biased]"] == pytest.approx(
        np.mean([metrics.cka(th.teacher, th.student[p]) for p in perms]), rel=1e-12)
    ratio = res.metrics["procrustes[distance]"] / res.chance["procrustes[distance]"]
    below = theory.check(th.teacher, th.student, eps=0.05, seed=3, permutations=3,
                         procrustes_threshold=ratio * 0.99)
    above = theory.check(th.teacher, th.student, eps=0.05, seed=3, permutations=3,
                         procrustes_threshold=ratio * 1.01)
    assert below.flagged and not above.flagged
    assert below.to_row()["chance_procrustes[distance]"] == res.chance["procrustes[distance]"]
    fixed = theory.check(th.teacher, th.student, eps=0.05, permutations=0)
    assert fixed.chance == {"procrustes[distance]": math.sqrt(2), "cka[linear,biased]": 0.0}


def test_check_rotated_student_keeps_everything():
    rng = np.random.default_rng(1)
    T = rng.standard_normal((60, 10))
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    res = theory.check(T, 3.0 * T @ Q + 1.0, eps=0.1)
    assert res.preserved_fraction == 1.0 and res.teacher_orthogonal_pairs > 0
    assert res.angle_distortion_deg["max"] < 1e-5 and res.max_inner_product_error < 1e-12
    assert not res.flagged and res.verdict.startswith("similar by CKA")


def test_check_unrelated_student_is_called_dissimilar():
    rng = np.random.default_rng(2)
    res = theory.check(rng.standard_normal((50, 8)), rng.standard_normal((50, 8)))
    assert not res.flagged and res.verdict.startswith("CKA says dissimilar")


def test_check_bad_input():
    with pytest.raises(UserError):
        theory.check(np.ones((10, 3)), np.ones((9, 3)))
    with pytest.raises(UserError):
        theory.check(np.eye(10), np.eye(10), eps=1.5)


def test_parse_layer_map():
    assert theory.parse_layer_map("12:6,6:3", range(13), range(7)) == [(12, 6), (6, 3)]
    assert theory.parse_layer_map("uniform", range(13), range(7)) == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5),
                                                                     (12, 6)]
    assert theory.parse_layer_map("uniform", range(4), range(3)) == [(2, 1), (3, 2)]
    for bad in ("12-6", "13:6", "12:7", ""):
        with pytest.raises(UserError):
            theory.parse_layer_map(bad, range(13), range(7))


def test_check_takes_every_layer_map_form_that_distill_takes(tmp_path):
    """One grammar for both commands: the line `compare --suggest-map` prints, CSV and JSON files, arrows."""
    from repsim.distill import parse_layer_map as distill_map

    printed = tmp_path / "map.txt"
    printed.write_text("suggested monotone layer map under procrustes[distance] (teacher→student): 0→0, 6→3, 12→6\n")
    csv = tmp_path / "map.csv"
    csv.write_text("teacher_layer,student_layer\n6,3\n12,6\n")
    js = tmp_path / "map.json"
    js.write_text("[[6, 3], [12, 6]]")
    for spec, expected in [(str(printed), [(0, 0), (6, 3), (12, 6)]), (str(csv), [(6, 3), (12, 6)]),
                           (str(js), [(6, 3), (12, 6)]), ("6->3 12->6", [(6, 3), (12, 6)])]:
        assert theory.parse_layer_map(spec, range(13), range(7)) == expected == distill_map(spec, 12, 6), spec
    broken = tmp_path / "broken.json"
    broken.write_text("[[6, 3],")
    for bad in (str(broken), str(tmp_path), "   "):
        with pytest.raises(UserError):
            theory.parse_layer_map(bad, range(13), range(7))
    with pytest.raises(FileNotFoundError):
        theory.parse_layer_map(str(tmp_path / "missing.txt"), range(13), range(7))


def test_check_layers_on_mapping():
    rng = np.random.default_rng(3)
    t = {k: rng.standard_normal((30, 8)) for k in range(5)}
    s = {k: t[2 * k] @ rng.standard_normal((8, 4)) for k in range(3)}
    checks = theory.check_layers(t, s, "uniform", permutations=20)
    table = theory.checks_table(checks)
    assert list(zip(table.teacher_layer, table.student_layer, strict=True)) == [(2, 1), (4, 2)]
    assert table["projection_residual[folds=5]"].notna().all()


def test_check_models_and_cli_on_tiny_models(tiny_model, tmp_path):
    teacher = tiny_model("bert", seed=0)
    student = tiny_model("bert", seed=1, layers=2)
    texts = _texts(24)
    res = theory.check_models(str(teacher), str(student), texts, "3:2,0:0", progress=False, out=tmp_path / "o",
                              permutations=20)
    assert [(c.teacher_layer, c.student_layer) for c in res.checks] == [(3, 2), (0, 0)]
    saved = pd.read_csv(tmp_path / "o" / "check.csv")
    assert len(saved) == 2 and "verdict" in saved.columns
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    r = subprocess.run([sys.executable, "-m", "repsim", "check", str(teacher), str(student), "--data", str(data),
                        "--map", "uniform", "--permutations", "20", "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layer 3 ↔ 2" in r.stdout and (tmp_path / "c" / "check.json").exists()
    page = (tmp_path / "o" / "report.html").read_text()
    assert 'href="#def-procrustes_distance"' in page and 'id="def-procrustes_distance"' in page
    assert all(str(escape(f"layer {c.teacher_layer} ↔ {c.student_layer}: {c.verdict}")) in page for c in res.checks)
    assert (tmp_path / "c" / "report.html").exists()
    import json

    report = json.loads((tmp_path / "c" / "check.json").read_text())
    assert report["meta"]["n"] == 24  # all texts by default, the texts `compare` uses
    assert all(c["chance"]["procrustes[distance]"] > 0 for c in report["checks"])
    assert all(c["permutations"] == 20 and set(c["p_value"]) == set(c["z"]) == set(c["chance"])
               for c in report["checks"])
    assert "against chance (20 seeded shuffles" in r.stdout


def test_cli_check_bad_map_is_one_line(tiny_model, tmp_path, capsys):
    teacher = tiny_model("bert", seed=0)
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(12)) + "\n")
    assert cli.main(["check", str(teacher), str(teacher), "--data", str(data), "--map", "9:1"]) == 2
    err = capsys.readouterr().err  # (model-loading progress bars may precede it)
    lines = [line for line in err.splitlines() if line.startswith("repsim: error:")]
    assert len(lines) == 1 and "teacher layer 9 out of range 0..3" in lines[0] and "Traceback" not in err


def test_geometry_before_after_on_tiny_models(tiny_model, tmp_path):
    teacher = tiny_model("bert", seed=0)
    student = tiny_model("bert", seed=1, layers=2)
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for words in (list(rng.choice(WORDS, size=rng.integers(3, 10))) for _ in range(120)):
        rows.append(" ".join(words) + f",{int('good' in words or 'great' in words)}")
    data = tmp_path / "d.csv"
    data.write_text("\n".join(rows) + "\n")
    table = theory.geometry_before_after(str(teacher), str(student), str(data), losses=("procrustes",),
                                         out=tmp_path / "ba", max_train=32, max_val=12, check_samples=12,
                                         distill_options={"batch_size": 16}, permutations=20)
    assert (tmp_path / "ba" / "procrustes" / "student" / "config.json").exists()
    assert list(dict.fromkeys(table.student)) == ["before", "procrustes"]
    assert set(zip(table.teacher_layer, table.student_layer, strict=True)) == {(2, 1), (3, 2)}  # trainer's map
    # "before" is the plain check of the untouched student against the fine-tuned teacher, on the validation texts
    from repsim.distill import load_train_validation

    texts = load_train_validation(str(data), max_train=32, max_val=12)[1].texts[:12]
    again = theory.check_models(str(tmp_path / "ba" / "teacher" / "model"), str(student), texts, "2:1,3:2",
                                progress=False, permutations=20).table
    before = table[table.student == "before"]
    np.testing.assert_allclose(before["procrustes[distance]"], again["procrustes[distance]"], atol=1e-12)
    np.testing.assert_allclose(before["p_value_procrustes[distance]"], again["p_value_procrustes[distance]"], atol=0)
    assert (table["permutations"] == 20).all()
    saved = pd.read_csv(tmp_path / "ba" / "geometry_before_after.csv")
    assert len(saved) == len(table) == 4
