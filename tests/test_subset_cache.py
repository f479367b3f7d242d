"""`--max-samples N` and `--layers` subsets are read from a cached extraction of more texts / more layers of the
same model: no forward pass, the same arrays as a direct extraction, and only when the texts really are rows
of the cached ones."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from repsim.activations import store
from repsim.activations.data import TextData, load_texts, subsample
from repsim.activations.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a movie film was good bad great funny boring and but not very plot acting story long short it".split()


def _data(n: int, seed: int = 0) -> TextData:
    rng = np.random.default_rng(seed)
    return TextData.from_texts([" ".join(rng.choice(WORDS, size=int(rng.integers(1, 25)))) for _ in range(n)])


def _counted(folder):
    """A (model, tokenizer) pair whose forward passes are counted."""
    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return (model, tok), calls


def _entries() -> list[Path]:
    root = Path(os.environ["REPSIM_CACHE"]) / "activations"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".partial"))


@pytest.mark.parametrize("pool", ["mean", "tokens"])
def test_max_samples_subset_is_served_without_the_model_and_equals_direct_extraction(tiny_model, pool):
    pair, calls = _counted(tiny_model("bert"))
    full_data = _data(30)
    full = extract(pair, full_data, pool=pool, batch_size=1, progress=False)
    assert calls[0] == 30
    sub_data = subsample(full_data, 11, seed=4)
    sub = extract(pair, sub_data, pool=pool, layers=[0, 2], batch_size=1, progress=False)
    assert calls[0] == 30  # served from the 30-text entry: no forward pass
    assert sub.meta["subset_of"] == full.meta["key"] and sub.meta["n_texts"] == 11
    assert sub.meta["texts_sha256"] == sub_data.fingerprint and sub.layers == [0, 2]
    direct = extract(pair, sub_data, pool=pool, layers=[0, 2], batch_size=1, cache=False, progress=False)
    assert calls[0] == 30 + 11
    # batch size 1: every text runs alone in both extractions, so the rows are the same computation, bit for bit
    np.testing.assert_array_equal(sub.stack(), direct.stack())
    if pool == "tokens":
        np.testing.assert_array_equal(sub.offsets, direct.offsets)
        np.testing.assert_array_equal(sub.token_ids, direct.token_ids)
    assert len(_entries()) == 1  # nothing new was written


def test_larger_batches_agree_to_rounding(tiny_model):
    """With batches of several texts the subset's batches hold other texts (other padding lengths), so values agree
    to float32 rounding, as a cache hit across batch sizes always has."""
    pair, calls = _counted(tiny_model("bert"))
    full_data = _data(24, seed=1)
    extract(pair, full_data, batch_size=4, progress=False)
    sub_data = subsample(full_data, 9, seed=0)
    before = calls[0]
    served = extract(pair, sub_data, batch_size=4, progress=False)
    assert calls[0] == before
    direct = extract(pair, sub_data, batch_size=4, cache=False, progress=False)
    np.testing.assert_allclose(served.stack(), direct.stack(), rtol=1e-5, atol=1e-6)


def test_nested_subsets_and_data_specs(tiny_model, tmp_path):
    """load_texts(--max-samples) on a file: the 6-text subset of the 15-text subset comes from the full entry."""
    folder = str(tiny_model("bert"))
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(_data(40, seed=2).texts))
    extract(folder, load_texts(f), batch_size=1, progress=False)
    nested = subsample(load_texts(f, max_samples=15, seed=7), 6, seed=1)
    served = extract(folder, nested, batch_size=1, progress=False)
    assert served.meta["cache_hit"] and served.meta["rows_of_superset"] == 40
    direct = extract(folder, nested, batch_size=1, cache=False, progress=False)
    np.testing.assert_array_equal(served.stack(), direct.stack())


def test_changed_texts_are_not_served_from_the_superset(tiny_model):
    """The record of where the rows come from is checked against the texts being extracted, not trusted."""
    pair, calls = _counted(tiny_model("bert"))
    full_data = _data(20, seed=3)
    extract(pair, full_data, batch_size=1, progress=False)
    sub = subsample(full_data, 8, seed=2)
    edited = dataclasses.replace(sub, texts=[sub.texts[0] + " indeed", *sub.texts[1:]], fingerprint="")
    assert edited.extra["supersets"] == sub.extra["supersets"]  # same record, different texts
    before = calls[0]
    acts = extract(pair, edited, batch_size=1, progress=False)
    assert calls[0] == before + 8 and "subset_of" not in acts.meta
    direct = extract(pair, edited, batch_size=1, cache=False, progress=False)
    np.testing.assert_array_equal(acts.stack(), direct.stack())


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_other_settings_do_not_serve(tiny_model):
    folder = str(tiny_model("bert"))
    full_data = _data(12, seed=4)
    extract(folder, full_data, batch_size=1, progress=False)
    sub = subsample(full_data, 5)
    for change in ({"pool": "cls"}, {"max_length": 6}):
        acts = extract(folder, sub, batch_size=1, progress=False, **change)
        assert not acts.meta["cache_hit"] and "subset_of" not in acts.meta


def test_any_entry_with_more_layers_serves_a_layer_subset(tiny_model):
    pair, calls = _counted(tiny_model("bert"))
    data = _data(9, seed=5)
    part = extract(pair, data, layers=[1, 2], batch_size=4, progress=False)
    n = calls[0]
    one = extract(pair, data, layers=[2], batch_size=4, progress=False)
    assert calls[0] == n and one.meta["subset_of"] == part.meta["key"]
    np.testing.assert_array_equal(one[2], part[2])
    assert isinstance(one[2], np.memmap)  # a layer subset of the same texts stays memory-mapped


def test_a_smaller_subset_is_served_from_a_cached_larger_subset(tiny_model):
    """--max-samples 12 then --max-samples 5 (same seed: nested): the 5 texts come from the 12-text entry."""
    pair, calls = _counted(tiny_model("bert"))
    full_data = _data(30, seed=6)
    mid, small = subsample(full_data, 12, seed=3), subsample(full_data, 5, seed=3)
    assert set(small.texts) <= set(mid.texts)
    mid_acts = extract(pair, mid, batch_size=1, progress=False)
    assert calls[0] == 12 and len(mid_acts.meta["drawn_from"][0]["rows_mask"]) == 8  # 30 bits in 4 bytes
    served = extract(pair, small, layers=[1], batch_size=1, progress=False)
    assert calls[0] == 12 and served.meta["subset_of"] == mid_acts.meta["key"]
    assert served.meta["rows_of_superset"] == 12
    np.testing.assert_array_equal(served.stack(), extract(pair, small, layers=[1], batch_size=1, cache=False,
                                                          progress=False).stack())
    other_seed = subsample(full_data, 5, seed=4)  # not inside the 12 of seed 3: extracted
    if not set(other_seed.texts) <= set(mid.texts):
        extract(pair, other_seed, batch_size=1, progress=False)
        assert calls[0] > 12 + 5


def test_find_superset_prefers_own_texts_then_fewer_rows(tiny_model):
    folder = str(tiny_model("bert"))
    big = _data(20, seed=6)
    small = subsample(big, 5, seed=0)
    big_acts = extract(folder, big, batch_size=4, progress=False)
    own = extract(folder, small, layers=[0, 1], batch_size=4, cache=True, progress=False)
    assert own.meta["subset_of"] == big_acts.meta["key"]  # served, nothing stored
    extract(folder, TextData.from_texts(small.texts), batch_size=4, progress=False)  # no record: its own entry
    assert len(_entries()) == 2
    meta = dict(own.meta, layers=[1])
    sources = [(r["fingerprint"], r["n_texts"], r["rows"]) for r in small.extra["supersets"]]
    acts, rows = store.find_superset(meta, sources)
    assert rows is None and acts.n_texts == 5  # the entry of the same texts wins over the 20-text one
