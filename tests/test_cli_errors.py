"""Bad command-line input, for every subcommand: exit status 2, exactly one stderr line starting with `repsim:`,
and nothing created or changed on disk (no output folder, no cache entry, no stray file), checked before any
model runs (an extraction would print its progress bar on stderr, which the one-line assertion catches)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from tiny_models import WORDS

from repsim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.fixture
def world(tmp_path, tiny_model, monkeypatch):
    """Two tiny models (read-only inputs elsewhere), data files of every kind under ``tmp_path/in``, cwd = tmp_path."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(40)]
    d = tmp_path / "in"
    files = {
        "txt": _write(d / "texts.txt", "\n".join(lines) + "\n"),
        "three": _write(d / "three.txt", "\n".join(lines[:3]) + "\n"),
        "labelled": _write(d / "labelled.csv", "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in
                                                                         enumerate(lines))),
        "array": _write(d / "array.jsonl", '{"text": "good film"}\n["a", "b"]\n'),
        "string": _write(d / "string.jsonl", '"just a string"\n'),
        "number": _write(d / "number.jsonl", '{"text": "good film"}\n{"text": 5}\n'),
        "null": _write(d / "null.jsonl", '{"text": "good film"}\n{"text": null}\n'),
        "bool": _write(d / "bool.jsonl", '{"text": true}\n'),
        "missing_key": _write(d / "missing.jsonl", '{"text": "good film"}\n{"other": "x"}\n'),
        "empty_jsonl": _write(d / "empty.jsonl", ""),
        "blank_jsonl": _write(d / "blank.jsonl", "\n \n"),
        "bad_json": _write(d / "bad.jsonl", '{"text": "a"}\n{bad\n'),
        "empty_csv": _write(d / "empty.csv", ""),
        "header_csv": _write(d / "header.csv", "text,label\r\n"),
        "bom_crlf_nocol": _write(d / "bom.csv", b"\xef\xbb\xbfbody,score\r\ngood film,1\r\nbad film,0\r\n"),
        "quote_csv": _write(d / "quote.csv", 'text\n"never closed\n'),
        "latin1": _write(d / "latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1")),
        "huge_line_latin1": _write(d / "huge.txt", b"a" * 2_000_000 + b"\n\xff\n"),
        "folder": d / "folder.txt",
        "broken_model": d / "broken_model",
        "list_config_model": d / "list_model",
    }
    files["folder"].mkdir()
    for name, config in (("broken_model", b'{"model_type": "bert", '), ("list_config_model", b"[1, 2]")):
        shutil.copytree(tiny_model("bert", seed=1), files[name])
        files[name].joinpath("config.json").write_bytes(config)
    monkeypatch.chdir(tmp_path)
    return {"t": str(tiny_model("bert", seed=0)), "s": str(tiny_model("bert", seed=1)), "tmp": str(tmp_path),
            **{k: str(v) for k, v in files.items()}}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# (subcommand arguments with {placeholders} from the world fixture, a fragment the one line must contain)
BAD = [
    # compare: numbers
    ("compare {t} {s} --data {txt} --seed -1 --max-samples 10", "--seed"),
    ("compare {t} {s} --data {txt} --seed 99999999999999999999", "seed must be an integer in 0..4294967295"),
    ("compare {t} {s} --data {txt} --max-samples 0", "--max-samples"),
    ("compare {t} {s} --data {txt} --max-samples -5", "--max-samples"),
    ("compare {t} {s} --data {txt} --max-samples 1", "--max-samples must be at least 2"),
    ("compare {t} {s} --data {txt} --max-samples abc", "expected an integer"),
    ("compare {t} {s} --data {txt} --batch-size 0", "--batch-size"),
    ("compare {t} {s} --data {txt} --max-length -1", "--max-length"),
    ("compare {t} {s} --data {txt} --bootstrap -1", "--bootstrap"),
    ("compare {t} {s} --data {txt} --bootstrap 10000000000000", "--bootstrap must be an integer in 0..100000"),
    ("compare {t} {s} --data {txt} --permutations -3", "--permutations"),
    # compare: metrics that the number of texts cannot carry, refused before extraction
    ("compare {t} {s} --data {three}",
     "projection_residual[folds=5,ridge=auto] (a default metric) needs at least 5 texts"),
    ("compare {t} {s} --data {txt} --max-samples 4", "needs at least 5 texts, the data has 4"),
    ("compare {t} {s} --data {txt} --metrics projection_residual[folds=50]", "needs at least 50 texts"),
    ("compare {t} {s} --data {three} --metrics cka[debiased]", "needs at least 4 texts"),
    ("compare {t} {s} --data {txt} --metrics nope", "unknown metric 'nope'"),
    ("compare {t} {s} --data {txt} --metrics ''", "unknown metric ''"),
    ("compare {t} {s} --data {txt} --stats-metrics cka --metrics procrustes", "--stats-metrics"),
    # compare: choices and layers
    ("compare {t} {s} --data {txt} --pool sentences", "invalid choice: 'sentences'"),
    ("compare {t} {s} --data {txt} --pool words --bootstrap 10", "computes its measures from streamed moments"),
    ("compare {t} {s} --data {txt} --pool words --metrics cka[rbf,sigma=1]", "need(s) every row in memory"),
    ("compare {t} {s} --data {txt} --device tpu", "unknown device 'tpu'"),
    ("compare {t} {s} --data {txt} --layers ''", "empty layer spec"),
    ("compare {t} {s} --data {txt} --layers 99", "unknown teacher layer 99"),
    ("compare {t} {s} --data {txt} --layers 3-1", "bad layer spec"),
    ("compare {t} {s} --data {txt} --layers 0-1000000000", "spans 1000000001 layers"),
    ("extract {t} --data {txt} --layers 0-1000000000", "spans 1000000001 layers"),
    ("compare {t} {s} --data {txt} --nonsense", "unrecognized arguments"),
    # compare: data files
    ("compare {t} {s} --data {array}", "line 2 is a JSON array, not an object"),
    ("compare {t} {s} --data {string}", "line 1 is a JSON string, not an object"),
    ("compare {t} {s} --data {number}", "must hold strings; line 2 has number 5"),
    ("compare {t} {s} --data {null}", "must hold strings; line 2 has null None"),
    ("compare {t} {s} --data {bool}", "must hold strings; line 1 has boolean True"),
    ("compare {t} {s} --data {missing_key}", "line 2 has no value"),
    ("compare {t} {s} --data {empty_jsonl}", "no texts in"),
    ("compare {t} {s} --data {blank_jsonl}", "no texts in"),
    ("compare {t} {s} --data {bad_json}", "line 2 is not valid JSON"),
    ("compare {t} {s} --data {empty_csv}", "the file is empty"),
    ("compare {t} {s} --data {header_csv}", "no texts in header.csv"),
    ("compare {t} {s} --data {bom_crlf_nocol}", "columns: body, score"),
    ("compare {t} {s} --data {bom_crlf_nocol} --text-column body --label-column nope", "no label column 'nope'"),
    ("compare {t} {s} --data {quote_csv}", "cannot read"),
    ("compare {t} {s} --data {latin1}", "is not UTF-8 text: byte 0xe9 at line 1"),
    ("compare {t} {s} --data {huge_line_latin1}", "is not UTF-8 text: byte 0xff at line 2"),
    ("compare {t} {s} --data {folder}", "is a folder"),
    ("compare {t} {s} --data {tmp}/none.csv", "data file not found"),
    ("compare {t} {s} --data data.xyz", "not found"),
    ("compare {t} {s} --data " + "a" * 5000 + ".txt", "File name too long"),
    ("compare {t} {s} --data {txt} --out " + "b" * 5000, "File name too long"),
    ("compare {t} {s} --data ''", "empty data spec"),
    ("compare {t} {s} --data hf:", "bad data spec"),
    ("compare {t} {s} --data {txt} --text-column text", "has no columns"),
    # compare: models and outputs
    ("compare {t} {broken_model} --data {txt}", "config.json is not valid JSON"),
    ("compare {t} {list_config_model} --data {txt}", "not an object"),
    ("compare {t} {txt} --data {txt}", "is a file, not a model folder"),
    ("compare {t} {folder} --data {txt}", "no config.json"),
    ("compare {t} {s} --data {txt} --out {txt}", "exists and is not a folder"),
    ("compare {t} {s} --data {txt} --out {txt}/sub", "is not a folder"),
    ("compare {t} {s} --data {txt} --out ''", "empty output folder name"),
    # extract
    ("extract {t} --data {txt} --seed -1", "--seed"),
    ("extract {t} --data {array}", "JSON array"),
    ("extract {t} --data {txt} --dtype float8", "invalid choice"),
    ("extract {t} --data {txt} --layers ''", "empty layer spec"),
    # cache
    ("cache prune --older-than -1", "--older-than"),
    ("cache prune --older-than nan", "--older-than"),
    ("cache prune --max-size 5XB", "bad size"),
    ("cache prune --max-size -5GB", "--max-size"),
    ("cache prune", "prune needs"),
    ("cache info ''", "empty cache key"),
    ("cache info nope", "the activation cache"),
    ("cache rm", "name the entries"),
    ("cache shred", "invalid choice"),
    # counterexample
    ("counterexample synthetic --eps -1", "--eps"),
    ("counterexample synthetic --eps 1", "--eps"),
    ("counterexample synthetic --eps nan", "--eps"),
    ("counterexample synthetic --steps 0", "--steps"),
    ("counterexample synthetic --seeds -1", "--seeds"),
    ("counterexample theorem1 --out {txt}", "exists and is not a folder"),
    ("counterexample lemma9", "invalid choice"),
    # check
    ("check {t} {s} --data {txt} --max-samples 1", "needs at least 6 texts"),
    ("check {t} {s} --data {three}", "needs at least 6 texts"),
    ("check {t} {s} --data {txt} --out {txt}", "exists and is not a folder"),
    ("check {t} {s} --data {txt} --eps 2", "--eps"),
    ("check {t} {s} --data {txt} --map garbage", "bad layer map"),
    ("check {t} {s} --data {txt} --cka-threshold nan", "--cka-threshold"),
    ("check {t} {s} --data {txt} --pool tokens", "invalid choice"),
    ("check {t} {s} --data {number}", "must hold strings"),
    # distill / finetune
    ("distill {t} {s} --data {labelled} --loss nope", "unknown feature loss 'nope'"),
    ("distill {t} {s} --data {labelled} --loss ''", "no feature loss given"),
    ("distill {t} {s} --data {labelled} --lr -1", "--lr"),
    ("distill {t} {s} --data {labelled} --lr nan", "--lr"),
    ("distill {t} {s} --data {labelled} --seeds 0", "--seeds"),
    ("distill {t} {s} --data {labelled} --epochs 0", "--epochs"),
    ("distill {t} {s} --data {labelled} --temperature 0", "--temperature"),
    ("distill {t} {s} --data {labelled} --beta -1", "--beta"),
    ("distill {t} {s} --data {labelled} --seed -1", "--seed"),
    ("distill {t} {s} --data {labelled} --out {txt}", "exists and is not a folder"),
    ("distill {t} {s} --data {txt}", "has no labels"),
    ("distill {t} {s} --data {labelled} --layer-map garbage", "layer map"),
    ("distill {t} {s} --data {labelled} --layer-map {tmp}/none.csv", "none.csv"),
    ("distill {t} {s} --data {labelled} --device tpu", "unknown device 'tpu'"),
    ("finetune {t} --data {labelled} --device tpu", "unknown device 'tpu'"),
    ("finetune {t} --data {labelled} --checkpoint-every -1", "--checkpoint-every"),
    ("finetune {t} --data {labelled} --val-data {empty_csv}", "the file is empty"),
    ("finetune {t} --data {labelled} --epochs 0", "--epochs"),
    ("finetune {t} --data {labelled} --max-length 1", "--max-length"),
    ("finetune {t} --data {labelled} --out {txt}", "exists and is not a folder"),
    ("finetune {t} --data {tmp}/none.csv", "data file not found"),
    # plot
    ("plot {txt}", "not a repsim results file"),
    ("plot {empty_csv}", "not a readable CSV file"),
    ("plot {folder}", "results file not found"),
    ("plot {tmp}/none.csv", "results file not found"),
    # the command itself
    ("frobnicate", "invalid choice"),
]


@pytest.mark.parametrize("args, fragment", BAD, ids=[a[:90] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capsys, args, fragment):
    import shlex

    argv = [a.format(**world) for a in shlex.split(args)]
    before = _snapshot(tmp_path)
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("repsim: "), captured.err
    assert fragment in lines[0] and len(lines[0]) < 600, lines[0]
    assert _snapshot(tmp_path) == before  # nothing written: no output folder, no cache entry, no stray file


def test_compare_ignores_labels_it_never_uses(world, tmp_path, capsys):
    """A label column of strings (pos/neg) does not stop a comparison; commands that train still refuse it."""
    rng = random.Random(1)
    path = tmp_path / "in" / "words.csv"
    rows = [(" ".join(rng.choice(WORDS) for _ in range(6)), rng.choice(["pos", "neg"])) for _ in range(12)]
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    status = main(["compare", world["t"], world["s"], "--data", str(path), "--metrics", "procrustes",
                   "--no-cache"])
    assert status == 0, capsys.readouterr().err
    from repsim.activations.data import load_texts
    from repsim.system.errors import UserError

    assert load_texts(path, labels=False).labels is None
    with pytest.raises(UserError, match="must hold integers; row 1 has"):
        load_texts(path)


def test_jsonl_texts_and_labels_by_line(tmp_path):
    """Blank lines are skipped; errors count lines of the file, not rows of the table."""
    from repsim.activations.data import load_texts
    from repsim.system.errors import UserError

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": "a", "label": 1}), "", json.dumps({"text": "b", "label": 0}),
                               json.dumps({"text": "c", "label": "x"})]))
    with pytest.raises(UserError, match="line 4 has 'x'"):
        load_texts(path)
    assert load_texts(path, labels=False).texts == ["a", "b", "c"]


def test_argparse_errors_are_one_line(capsys):
    assert main(["compare", "--batch-size", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repsim: error: argument --batch-size") and "--help" in lines[0]


def test_help_still_exits_0(capsys):
    assert main(["compare", "--help"]) == 0 and "--max-samples" in capsys.readouterr().out


def test_counterexample_projection_writes_what_it_says(tmp_path, capsys):
    import pandas as pd

    import repsim.theory as theory

    out = tmp_path / "out"
    assert main(["counterexample", "projection", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote tables and figures to {out}" in printed
    table = pd.read_csv(out / "theory_projection.csv")
    pc = theory.projection_counterexample()
    value = table.set_index(["construction", "quantity"])["value"]
    assert value["projection_counterexample", "student_cos_12"] == pytest.approx(pc.student_cos_12, rel=1e-12)
    assert value["projection_counterexample", "projection_loss"] == pytest.approx(pc.loss, abs=1e-12)
    assert f"cos(row1,row2): teacher {pc.teacher_cos_12:.6f}, student {pc.student_cos_12:.6f}" in printed
    assert sorted(os.listdir(out)) == ["theory_projection.csv"]


def test_library_messages_name_parameters_and_the_command_line_shows_its_flags(world, capsys):
    """The library says `max_samples`; `repsim compare` says --max-samples (and `repsim check`'s `layer_map` is
    its --map): one message, each face in its own words."""
    from repsim.analysis.comparison import compare
    from repsim.cli.flags import as_flags
    from repsim.system.errors import UserError

    with pytest.raises(UserError) as raised:
        compare(world["t"], world["s"], world["txt"], max_samples=1)
    assert "`max_samples` must be at least 2" in str(raised.value) and "--" not in str(raised.value)
    assert main(["compare", world["t"], world["s"], "--data", world["txt"], "--max-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "--max-samples must be at least 2" in err and "`" not in err
    flags = {"pool": "--pool", "layer_map": "--map", "finetune_teacher": "--finetune-teacher"}
    assert as_flags("use `pool='words'` or `pool=mean|cls|last`", flags) == "use --pool words or --pool mean|cls|last"
    assert as_flags("`layer_map` and `finetune_teacher=True`", flags) == "--map and --finetune-teacher"
    assert as_flags("`seeds` stays", flags) == "`seeds` stays"  # no flag of this command: left as the library wrote it


def test_no_library_message_names_a_command_line_flag():
    """Errors and warnings raised outside repsim/cli name parameters (between backticks), never --flags."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent / "repsim"
    flag = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in ("UserError", "AssetError", "warn"):
                continue
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and flag.search(part.value):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {part.value[:60]}")
    assert not found, found
