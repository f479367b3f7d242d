"""repsim.activations.data: data specs, file formats, the offline SST-like sample, fingerprints, and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim.activations.data import SST2_VALIDATION_SIZE, TextData, fingerprint_texts, load_texts
from repsim.system.errors import UserError

# ------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_matches_its_definition():
    """sha256 over (8-byte little-endian UTF-8 length, bytes) per text, computed here independently."""
    texts = ["a", "", "héllo wörld", "x" * 300]
    stream = b"".join(len(t.encode()).to_bytes(8, "little") + t.encode() for t in texts)
    assert fingerprint_texts(texts) == hashlib.sha256(stream).hexdigest()
    assert fingerprint_texts([]) == hashlib.sha256(b"").hexdigest()


def test_fingerprint_sees_order_content_and_boundaries():
    base = fingerprint_texts(["good film", "bad film"])
    assert fingerprint_texts(["bad film", "good film"]) != base  # order
    assert fingerprint_texts(["good film", "bad film!"]) != base  # content
    assert fingerprint_texts(["ab", "c"]) != fingerprint_texts(["a", "bc"])  # boundaries
    assert fingerprint_texts(["ab", "c"]) != fingerprint_texts(["abc"])
    assert fingerprint_texts(["good film", "bad film"]) == base  # and nothing else


def test_fingerprint_ignores_labels_name_and_source():
    a = TextData(["x", "y"], [0, 1], "one", "here")
    b = TextData(["x", "y"], [1, 1], "two", "there", offline_fallback=True)
    c = TextData.from_texts(["x", "y"])
    assert a.fingerprint == b.fingerprint == c.fingerprint == fingerprint_texts(["x", "y"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=5), st.lists(st.text(max_size=6), max_size=5))
def test_fingerprint_equal_iff_texts_equal(first, second):
    assert (fingerprint_texts(first) == fingerprint_texts(second)) == (first == second)


# ------------------------------------------------------------------------------------ local files

TRICKY = ["plain", "with, a comma", 'with "quotes"', "ünïcödé ✓ 映画", "NA", "null", "007", "  padded  ", "1.5"]
LABELS = [0, 1, 1, 0, 1, 0, 1, 0, 2]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_formats_round_trip_with_named_columns(tmp_path, suffix):
    frame = pd.DataFrame({"review": TRICKY, "stars": LABELS, "other": range(len(TRICKY))})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path)
    data = load_texts(str(path), text_column="review", label_column="stars")
    assert data.texts == [t.strip() for t in TRICKY]  # surrounding whitespace stripped, nothing else changed
    assert data.labels == LABELS
    assert data.n_dropped == 0 and not data.offline_fallback
    assert data.fingerprint == fingerprint_texts(data.texts)
    assert data.name == path.name and str(path) in data.source


def test_default_columns_text_and_label_are_found(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": t, "label": i % 2}) for i, t in enumerate("abc")))
    data = load_texts(path)
    assert data.texts == ["a", "b", "c"] and data.labels == [0, 1, 0]


def test_txt_one_text_per_line_blank_lines_dropped_and_counted(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufefffirst line\r\n\r\n  second, with comma  \n \t \nthird\n".encode())
    data = load_texts(path)
    assert data.texts == ["first line", "second, with comma", "third"]
    assert data.n_dropped == 2 and data.labels is None


def test_empty_rows_in_tables_are_dropped_with_their_labels(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "", "c", "   "], "label": [1, 0, 0, 1]}).to_csv(path, index=False)
    data = load_texts(path)
    assert data.texts == ["a", "c"] and data.labels == [1, 0] and data.n_dropped == 2


def test_max_samples_is_a_seeded_nested_subset_in_original_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"text {i}" for i in range(100)))
    full = load_texts(path)
    small, large = load_texts(path, max_samples=10, seed=3), load_texts(path, max_samples=40, seed=3)
    positions = [full.texts.index(t) for t in large.texts]
    assert positions == sorted(positions) and len(large.texts) == 40  # original order
    assert set(small.texts) <= set(large.texts)  # nested
    assert load_texts(path, max_samples=10, seed=3).texts == small.texts  # deterministic
    assert load_texts(path, max_samples=10, seed=4).texts != small.texts  # the seed matters
    assert small.fingerprint == fingerprint_texts(small.texts) != full.fingerprint
    assert load_texts(path, max_samples=1000).texts == full.texts


# ------------------------------------------------------------------------------------ bad input


def _user_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_texts(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    _user_error("data file not found", str(tmp_path / "nope.csv"))


def test_unknown_format(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    message = _user_error("unknown data format '.xlsx'", path)
    assert ".parquet" in message  # says what is supported


def test_missing_column_lists_the_available_ones(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"sentence_a": ["x"], "score": [1]}).to_csv(path, index=False)
    message = _user_error("no text column 'text'", path, text_column="text")
    assert "sentence_a" in message and "score" in message
    _user_error("no label column 'label'", path, text_column="sentence_a", label_column="label")
    _user_error("which column holds the text", path)  # two columns, none named like text


@pytest.mark.parametrize("bad", ["positive", "1.5"])
def test_non_integer_labels(tmp_path, bad):
    path = tmp_path / "d.tsv"
    path.write_text(f"text\tlabel\ngood\t1\nmeh\t{bad}\n")
    message = _user_error("must hold integers", path)
    assert "row 2" in message and bad in message


def test_empty_data(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n\n")
    _user_error("no texts in e.txt", empty)


def test_non_utf8_file_names_line_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\xe9 au lait\n".encode("latin-1"))
    message = _user_error("not UTF-8", path)
    assert "0xe9" in message and "line 3" in message
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("text\nna\xefve\n".encode("latin-1"))
    assert "line 2" in _user_error("not UTF-8", csv)


def test_bad_specs(tmp_path):
    _user_error("max_samples must be at least 1", "sst2", max_samples=0)
    _user_error("is a folder", tmp_path)
    _user_error("empty data spec", "  ")
    path = tmp_path / "t.txt"
    path.write_text("x\n")
    _user_error("does not apply to a local file", path, split="train")
    _user_error("has no columns", path, text_column="text")
    _user_error("bad data spec", "hf:")


def test_hf_spec_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    message = _user_error("cannot reach the Hugging Face hub", "hf:imdb@test")
    assert "local file" in message and "sst2" in message
    assert time.perf_counter() - start < 15  # no retries against an unreachable hub


# ------------------------------------------------------------------------------------ the SST-like sample


@pytest.fixture
def offline_sst2(monkeypatch):
    """No hub; the assets come from the shared, pinned assets cache that conftest sets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _snippets_by_text() -> dict[str, float]:
    """The snippet file parsed independently: text → human sentiment score (first occurrence)."""
    from repsim.activations.assets import snippets_file

    frame = pd.read_csv(snippets_file(), sep="\t", header=None, names=["id", "score", "text"], quoting=3,
                        dtype={"text": str}, keep_default_na=False)
    scores: dict[str, float] = {}
    for text, score in zip(frame["text"].str.strip(), frame["score"], strict=True):
        scores.setdefault(text, float(score))
    return scores


@pytest.mark.real
def test_offline_sst2_fallback_is_the_documented_sample(offline_sst2, caplog):
    with caplog.at_level(logging.WARNING, logger="repsim.activations.data"):
        validation = load_texts("sst2")
    assert "offline SST-like sample" in caplog.text  # announced
    train = load_texts("sst2", split="train")
    assert validation.offline_fallback and train.offline_fallback
    assert "SST-like sample" in validation.source and "offline" in validation.source
    assert len(validation) == SST2_VALIDATION_SIZE == 872
    assert not set(validation.texts) & set(train.texts)  # disjoint
    scores = _snippets_by_text()
    eligible = {t for t, s in scores.items() if abs(s) >= 1 and t}
    assert set(validation.texts) | set(train.texts) == eligible  # together: every sentence with |score| >= 1
    assert len(validation.texts) + len(train.texts) == len(eligible)  # no duplicates
    for data in (validation, train):
        assert data.labels == [int(scores[t] > 0) for t in data.texts]  # label = sign of the human score
        order = [list(scores).index(t) for t in data.texts[:50]]
        assert order == sorted(order)  # file order
    assert 0.4 < np.mean(validation.labels) < 0.6


@pytest.mark.real
def test_offline_sst2_fallback_is_deterministic(offline_sst2):
    first, second = load_texts("sst2"), load_texts("sst2")
    assert first.texts == second.texts and first.labels == second.labels
    assert first.fingerprint == second.fingerprint == fingerprint_texts(first.texts)
    subset = load_texts("sst2", max_samples=100, seed=7)
    assert len(subset) == 100 and set(subset.texts) <= set(first.texts)
    with pytest.raises(UserError, match="only available from GLUE"):
        load_texts("sst2", split="test")
    with pytest.raises(UserError, match="unknown sst2 split"):
        load_texts("sst2", split="dev")
