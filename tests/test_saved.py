"""`repsim compare --teacher-acts PATH --student-acts PATH`: saved .npy / .safetensors activations compared as
if they came from models (same values as `Comparison.from_layers`), layers named and ordered from file names,
one-line errors for bad files, provenance with the sha256 of every array."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from repsim import cli
from repsim.activations.data import sample_rows
from repsim.activations.saved import layer_numbers, load_saved_layers, natural_key
from repsim.analysis.comparison import Comparison, compare_saved
from repsim.system.errors import UserError

N = 40


@pytest.fixture
def saved(tmp_path):
    """Teacher: 11 layers as layer_0.npy … layer_10.npy; student: one (3, N, 5) stack whose layer 1 is an
    orthogonal transform (scaled, shifted) of teacher layer 10, so procrustes is 0 at exactly (10, 1)."""
    rng = np.random.default_rng(0)
    teacher = [rng.standard_normal((N, 6 if k < 10 else 5)) for k in range(11)]
    twin = 3.0 * teacher[10] @ np.linalg.qr(rng.standard_normal((5, 5)))[0] + 1.0
    student = np.stack([rng.standard_normal((N, 5)), twin, rng.standard_normal((N, 5))])
    tdir = tmp_path / "teacher_acts"
    tdir.mkdir()
    for k, a in enumerate(teacher):
        np.save(tdir / f"layer_{k}.npy", a)
    (tdir / "notes.txt").write_text("ignored")
    np.save(tmp_path / "student.npy", student)
    return tdir, tmp_path / "student.npy", teacher, list(student)


def test_natural_sort_and_layer_numbers():
    names = ["layer_10", "layer_2", "layer_1", "Layer_3"]
    assert sorted(names, key=natural_key) == ["layer_1", "layer_2", "Layer_3", "layer_10"]
    assert layer_numbers(["h.2", "h.10", "emb0"]) == [2, 10, 0]
    assert layer_numbers(["embeddings", "h.1"]) == [0, 1]  # one name without a number: positions
    assert layer_numbers(["a_1", "b_1"]) == [0, 1]  # repeated numbers: positions


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=20, unique=True))
def test_natural_key_orders_numbered_names_by_value(numbers):
    names = [f"layer_{k}" for k in numbers]
    assert [int(n[6:]) for n in sorted(names, key=natural_key)] == sorted(numbers)


def test_folder_and_stack_equal_from_layers_and_find_the_twin(saved, tmp_path):
    tdir, sfile, teacher, student = saved
    metrics = ["procrustes", "cka", "gram_frobenius"]
    comp = compare_saved(tdir, sfile, metrics=metrics, device="cpu")
    assert comp.teacher_layers == list(range(11)) and comp.student_layers == [0, 1, 2]
    ref = Comparison.from_layers(teacher, student, metrics, device="cpu")
    for m in metrics:
        np.testing.assert_allclose(comp.matrix(m), ref.matrix(m), rtol=1e-12, atol=0)
    proc = comp.matrix("procrustes")
    assert np.argwhere(proc < 1e-6).tolist() == [[10, 1]]  # layer_10.npy is row 10, stack index 1 is column 1
    assert proc[10, 1] == pytest.approx(0, abs=1e-6) and np.delete(proc.ravel(), 10 * 3 + 1).min() > 0.1
    prov = comp.meta["teacher"]["activations"]["layers"]
    assert [p["name"] for p in prov] == [f"layer_{k}" for k in range(11)]
    for p, arr in zip(prov, teacher, strict=True):
        assert p["sha256"] == hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        assert p["shape"] == list(arr.shape) and p["dtype"] == "float64"
    assert [p["tensor"] for p in comp.meta["student"]["activations"]["layers"]] == ["[0]", "[1]", "[2]"]


def test_npy_files_are_memory_mapped_and_left_untouched(saved):
    tdir, sfile, _, _ = saved
    before = {p.name: p.read_bytes() for p in tdir.iterdir()}
    layers = load_saved_layers(tdir)
    assert all(isinstance(a, np.memmap) for a in layers.arrays)
    compare_saved(tdir, sfile, metrics=["procrustes"], device="cpu")
    assert {p.name: p.read_bytes() for p in tdir.iterdir()} == before


def test_safetensors_one_tensor_per_layer_numbered_from_names(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"h.10": rng.standard_normal((N, 4)).astype(np.float32), "h.2": rng.standard_normal((N, 3))}
    save_file(arrays, tmp_path / "t.safetensors")
    bf16 = torch.randn(N, 4).to(torch.bfloat16)
    save_torch({"h.0": bf16}, tmp_path / "s.safetensors")
    layers = load_saved_layers(tmp_path / "t.safetensors")
    assert layers.ids == [2, 10] and layers.names == ["h.2", "h.10"]
    np.testing.assert_array_equal(layers.arrays[1], arrays["h.10"])
    student = load_saved_layers(tmp_path / "s.safetensors", "student")
    np.testing.assert_array_equal(student.arrays[0], bf16.float().numpy())  # bfloat16 read exactly as float32
    comp = compare_saved(tmp_path / "t.safetensors", tmp_path / "s.safetensors", metrics=["cka"], layers=["t:-1"],
                         device="cpu")
    assert comp.teacher_layers == [10] and comp.student_layers == [0]
    assert comp.matrix("cka")[0, 0] == pytest.approx(
        Comparison.from_layers([arrays["h.10"]], [bf16.float().numpy()], ["cka"]).matrix("cka")[0, 0], rel=1e-12)


def test_max_samples_takes_the_same_rows_as_texts(saved):
    tdir, sfile, teacher, student = saved
    comp = compare_saved(tdir, sfile, metrics=["procrustes"], max_samples=17, seed=3, device="cpu",
                         layers=["t:0", "t:10", "s:1"])
    rows = sample_rows(N, 17, 3)
    ref = Comparison.from_layers([teacher[0][rows], teacher[10][rows]], [student[1][rows]], ["procrustes"])
    np.testing.assert_allclose(comp.matrix("procrustes"), ref.matrix("procrustes"), rtol=1e-12)
    assert comp.meta["data"]["n_texts"] == 17 and comp.meta["data"]["n_rows_saved"] == N


def test_cli_writes_results_and_provenance(saved, tmp_path, capsys):
    tdir, sfile, teacher, student = saved
    out = tmp_path / "out"
    assert cli.main(["compare", "--teacher-acts", str(tdir), "--student-acts", str(sfile), "--metrics", "procrustes",
                     "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out / "results.csv")
    best = table.loc[table["value"].idxmin()]
    assert (best.teacher_layer, best.student_layer) == (10, 1) and best.value < 1e-6
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["name"] == "teacher_acts" and report["student"]["name"] == "student.npy"
    assert report["student"]["activations"]["layers"][1]["sha256"] == hashlib.sha256(
        np.ascontiguousarray(student[1]).tobytes()).hexdigest()
    assert "rows     40 of 40" in capsys.readouterr().out


def _write(tmp_path, name, arr):
    np.save(tmp_path / name, arr)
    return str(tmp_path / name)


@pytest.mark.parametrize("case, message", [
    ("rows", "the teacher activations have 40 rows and the student's 39"),
    ("nan", "row 3 holds NaN or inf"),
    ("1d", "expected a 2-D (texts, width) array"),
    ("int", "must be floating point"),
    ("missing", "student activations not found"),
    ("empty_dir", "no .npy or .safetensors files"),
    ("one_side", "give both --teacher-acts and --student-acts"),
    ("with_data", "--data does not apply to saved activations"),
    ("with_models", "not both"),
    ("layer", "unknown student layer 7"),
    ("pickle", "cannot read"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, case, message):
    rng = np.random.default_rng(0)
    t = _write(tmp_path, "t.npy", rng.standard_normal((N, 3)))
    s = _write(tmp_path, "s.npy", rng.standard_normal((N, 3)))
    extra: list[str] = []
    if case == "rows":
        s = _write(tmp_path, "s.npy", rng.standard_normal((N - 1, 3)))
    elif case == "nan":
        bad = rng.standard_normal((N, 3))
        bad[3, 1] = np.nan
        s = _write(tmp_path, "s.npy", bad)
    elif case == "1d":
        s = _write(tmp_path, "s.npy", rng.standard_normal(N))
    elif case == "int":
        s = _write(tmp_path, "s.npy", np.ones((N, 3), dtype=np.int64))
    elif case == "missing":
        s = str(tmp_path / "nope.npy")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        s = str(tmp_path / "empty")
    elif case == "layer":
        extra = ["--layers", "s:7"]
    elif case == "pickle":
        np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        s = str(tmp_path / "obj.npy")
    args = ["compare", "--teacher-acts", t, "--student-acts", s, "--device", "cpu", "--out", str(tmp_path / "out")]
    if case == "one_side":
        args = ["compare", "--teacher-acts", t]
    elif case == "with_data":
        args += ["--data", "sst2"]
    elif case == "with_models":
        args = ["compare", "a", "b", "--teacher-acts", t, "--student-acts", s]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_layers_of_a_folder_must_agree_on_rows(tmp_path):
    d = tmp_path / "acts"
    d.mkdir()
    np.save(d / "layer_0.npy", np.ones((5, 2)))
    np.save(d / "layer_1.npy", np.ones((6, 2)))
    with pytest.raises(UserError, match="different row counts"):
        load_saved_layers(d)
