"""Extraction: pooling against hand computations, layer indexing against forward hooks, batching invariance."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoTokenizer

from repsim.activations.extract import (
    check_same_tokenizer,
    extract,
    extract_moments,
    same_tokenizer,
    tokenizer_fingerprint,
)
from repsim.activations.layers import resolve_layers
from repsim.activations.pooling import last_token_index, pool_hidden
from repsim.system.errors import UserError

TEXTS = [
    "the movie was good",
    "bad",
    "a very long and boring plot with terrible acting and a slow ending that i hated",
    "i loved it",
    "funny , charming and smart",
    "the story is quite dull but the music is beautiful",
    "not great",
    "this film was really awful and the characters were ugly and slow",
    "it",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _loaded(folder) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) loaded once per folder; extract() accepts the pair as a model spec."""
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _hand_hidden(folder, text: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Hidden states of one text run alone (no padding at all): the reference for every pooled vector."""
    model, tok = _loaded(folder)
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return out.hidden_states, enc["input_ids"][0]


@contextlib.contextmanager
def _capture(modules: dict[int, torch.nn.Module]):
    """Forward hooks that record each module's output (first element of tuples), removed on exit."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for k, mod in modules.items():
        def hook(_m, _inp, out, k=k):
            seen[k] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(mod.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ pooling by hand


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 7), seed=st.integers(0, 10_000), left=st.booleans())
def test_pool_hidden_matches_loops(b, t, seed, left):
    """mean = Σ m h / Σ m, last = h at the last real token, cls = first real token, tokens = masked rows,
    for random masks padded on either side."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, 3, generator=g)
    lens = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lens):
        if left:
            mask[i, t - n:] = 1
        else:
            mask[i, :n] = 1
    mean = pool_hidden(h, mask, "mean", torch.float64)
    last = pool_hidden(h, mask, "last")
    cls = pool_hidden(h, mask, "cls")
    toks = pool_hidden(h, mask, "tokens")
    rows = []
    for i in range(b):
        real = [j for j in range(t) if mask[i, j]]
        assert torch.allclose(mean[i], h[i, real].double().mean(0))
        assert torch.equal(last[i], h[i, real[-1]])
        assert torch.equal(cls[i], h[i, real[0]])
        assert int(last_token_index(mask)[i]) == real[-1]
        rows.append(h[i, real])
    assert torch.equal(toks, torch.cat(rows))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mean_pooling_equals_masked_mean_of_unpadded_text(tiny_model, kind):
    folder = tiny_model(kind)
    acts = extract(str(folder), TEXTS, pool="mean", batch_size=4, cache=False, progress=False)
    for i, text in enumerate(TEXTS):
        hs, _ = _hand_hidden(folder, text)
        for k in acts.layers:
            np.testing.assert_allclose(acts[k][i], hs[k][0].mean(0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_pooling_picks_last_real_token(tiny_model, padding_side):
    """GPT-2 with left or right padding: pooled 'last' = hidden state of the text's final token, run alone."""
    folder = tiny_model("gpt2", padding_side=padding_side)
    acts = extract(_loaded(folder), TEXTS, pool="last", batch_size=4, cache=False, progress=False)
    assert acts.meta["padding_side"] == padding_side
    for i, text in enumerate(TEXTS):
        hs, _ = _hand_hidden(folder, text)
        for k in acts.layers:
            np.testing.assert_allclose(acts[k][i], hs[k][0, -1].numpy(), rtol=1e-5, atol=1e-5)
    # and the features really differ between texts (the test can fail if padding leaked in)
    assert not np.allclose(acts[acts.layers[-1]][0], acts[acts.layers[-1]][1])


def test_cls_pooling_is_first_token(tiny_model):
    folder = tiny_model("bert")
    acts = extract(_loaded(folder), TEXTS, pool="cls", batch_size=3, cache=False, progress=False)
    for i, text in enumerate(TEXTS):
        hs, ids = _hand_hidden(folder, text)
        assert int(ids[0]) == AutoTokenizer.from_pretrained(folder).cls_token_id
        np.testing.assert_allclose(acts[2][i], hs[2][0, 0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,padding_side", [("bert", "right"), ("llama", "left"), ("gpt2", "left"),
                                               ("opt", "right")])
def test_batching_and_order_do_not_change_features(tiny_model, kind, padding_side):
    pair = _loaded(tiny_model(kind, padding_side=padding_side))
    for pool in ("mean", "cls", "last", "tokens"):
        _check_batch_invariance(pair, pool)


def _check_batch_invariance(pair, pool):
    ref = extract(pair, TEXTS, pool=pool, batch_size=1, cache=False, progress=False)
    for bs, sort in ((4, True), (4, False), (len(TEXTS), True)):
        got = extract(pair, TEXTS, pool=pool, batch_size=bs, sort_by_length=sort, cache=False, progress=False)
        np.testing.assert_allclose(got.stack(), ref.stack(), rtol=1e-5, atol=2e-5)
    # reversing the input reverses the rows
    rev = extract(pair, TEXTS[::-1], pool=pool, batch_size=4, cache=False, progress=False)
    if pool == "tokens":
        for i in range(len(TEXTS)):
            j = len(TEXTS) - 1 - i
            np.testing.assert_allclose(rev[1][rev.texts_rows(j)], ref[1][ref.texts_rows(i)], rtol=1e-5, atol=2e-5)
    else:
        np.testing.assert_allclose(rev.stack()[:, ::-1], ref.stack(), rtol=1e-5, atol=2e-5)


def test_tokens_pool_offsets_and_ids(tiny_model):
    folder = tiny_model("bert")
    tok = AutoTokenizer.from_pretrained(folder)
    acts = extract(str(folder), TEXTS, pool="tokens", batch_size=4, cache=False, progress=False)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert acts.offsets.tolist() == np.concatenate([[0], np.cumsum([len(x) for x in ids])]).tolist()
    assert acts.token_ids.tolist() == [i for x in ids for i in x]
    assert acts.n == acts.offsets[-1] and acts.n_texts == len(TEXTS)
    hs, _ = _hand_hidden(folder, TEXTS[2])
    np.testing.assert_allclose(acts[3][acts.texts_rows(2)], hs[3][0].numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ layer indexing


def test_bert_layers_equal_block_outputs(tiny_model):
    """layer 0 = embeddings module output, layer k = encoder block k output (no final norm in BERT)."""
    folder = tiny_model("bert")
    acts = extract(str(folder), TEXTS[:3], pool="tokens", cache=False, progress=False)
    model, tok = _loaded(folder)
    L = model.config.num_hidden_layers
    assert acts.layers == list(range(L + 1)) and acts.meta["final_norm"] is None
    modules = {0: model.embeddings, **{k: model.encoder.layer[k - 1] for k in range(1, L + 1)}}
    for i, text in enumerate(TEXTS[:3]):
        with _capture(modules) as seen, torch.no_grad():
            model(**tok([text], return_tensors="pt"))
        for k in range(L + 1):
            np.testing.assert_allclose(acts[k][acts.texts_rows(i)], seen[k][0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,norm_attr", [("llama", "norm"), ("gpt2", "ln_f"), ("opt", "final_layer_norm")])
def test_decoder_layers_and_final_norm(tiny_model, kind, norm_attr):
    """Decoders: layer 0 = token embeddings (+ positions), layer k < L = block k output, and layer L =
    final_norm(block L output), NOT the raw block L output."""
    folder = tiny_model(kind)
    acts = extract(str(folder), TEXTS[:3], pool="tokens", cache=False, progress=False)
    model, tok = _loaded(folder)
    core = model.decoder if kind == "opt" else model
    blocks = core.h if kind == "gpt2" else core.layers
    L = len(blocks)
    assert acts.layers == list(range(L + 1))
    assert acts.meta["final_norm"].split(".")[-1] == norm_attr
    modules = {k: blocks[k - 1] for k in range(1, L + 1)}
    modules[L + 1] = getattr(core, norm_attr)  # L + 1 = the final norm's output
    for i, text in enumerate(TEXTS[:3]):
        with _capture(modules) as seen, torch.no_grad():
            model(**tok([text], return_tensors="pt"))
        rows = acts.texts_rows(i)
        for k in range(1, L):
            np.testing.assert_allclose(acts[k][rows], seen[k][0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(acts[L][rows], seen[L + 1][0].numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(acts[L][rows], seen[L][0].numpy(), atol=1e-3)


def test_llama_layer0_is_token_embedding(tiny_model):
    folder = tiny_model("llama")
    acts = extract(str(folder), TEXTS[:2], pool="tokens", layers=[0], cache=False, progress=False)
    model = AutoModel.from_pretrained(folder).eval()
    emb = model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(acts[0], emb[acts.token_ids], rtol=0, atol=0)


def test_encoder_decoder_uses_encoder_states(tmp_path, tiny_model):
    """T5: hidden states are the encoder's; layer k = encoder block k output, last = final_layer_norm."""
    from transformers import T5Config, T5Model

    tok = AutoTokenizer.from_pretrained(tiny_model("bert"))
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2,
                   num_decoder_layers=1, pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T5Model(cfg).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    acts = extract(str(tmp_path), TEXTS[:2], pool="tokens", cache=False, progress=False)
    assert acts.layers == [0, 1, 2] and acts.width == 16
    model = T5Model.from_pretrained(tmp_path).eval()
    enc = model.get_encoder()
    with _capture({1: enc.block[0], 3: enc.final_layer_norm}) as seen, torch.no_grad():
        enc(**tok([TEXTS[0]], return_tensors="pt"))
    np.testing.assert_allclose(acts[1][acts.texts_rows(0)], seen[1][0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts[2][acts.texts_rows(0)], seen[3][0].numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ options and errors


def test_layer_selection():
    assert resolve_layers(None, 6) == list(range(7))
    assert resolve_layers([0, -1], 6) == [0, 6]
    assert resolve_layers("0,2-4", 6) == [0, 2, 3, 4]
    assert resolve_layers("all", 3) == [0, 1, 2, 3]
    for bad in ([7], [-8], "x"):
        with pytest.raises(UserError, match="layer"):
            resolve_layers(bad, 6)


def test_unknown_layer_and_empty_data_are_user_errors(tiny_model):
    folder = str(tiny_model("bert"))
    with pytest.raises(UserError, match="unknown layer index 9"):
        extract(folder, TEXTS, layers=[9], cache=False, progress=False)
    with pytest.raises(UserError, match="empty"):
        extract(folder, [], cache=False, progress=False)
    with pytest.raises(UserError, match="pooling"):
        extract(folder, TEXTS, pool="max", cache=False, progress=False)
    with pytest.raises(UserError, match="dtype"):
        extract(folder, TEXTS, dtype="int8", cache=False, progress=False)


def test_device_choice():
    from repsim.system.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu9")


def test_truncation_is_counted_and_warned(tiny_model):
    folder = str(tiny_model("bert"))
    tok = AutoTokenizer.from_pretrained(folder)
    n_long = sum(len(tok(t)["input_ids"]) > 6 for t in TEXTS)
    assert 0 < n_long < len(TEXTS)
    with pytest.warns(UserWarning, match=f"{n_long} of {len(TEXTS)} texts are longer than max_length=6"):
        acts = extract(folder, TEXTS, pool="tokens", max_length=6, cache=False, progress=False)
    assert acts.meta["n_truncated"] == n_long
    assert int(np.diff(acts.offsets).max()) == 6


def test_selected_layers_and_negative_index(tiny_model):
    folder = str(tiny_model("bert"))
    full = extract(folder, TEXTS, cache=False, progress=False)
    part = extract(folder, TEXTS, layers=[0, -1], cache=False, progress=False)
    assert part.layers == [0, 3]
    np.testing.assert_array_equal(part[-1], full[3])
    with pytest.raises(UserError, match="not extracted"):
        part[1]


def test_bfloat16_and_float64_accumulation(tiny_model):
    folder = str(tiny_model("bert"))
    ref = extract(folder, TEXTS, cache=False, progress=False)
    acc64 = extract(folder, TEXTS, accumulate="float64", cache=False, progress=False)
    bf16 = extract(folder, TEXTS, dtype="bfloat16", cache=False, progress=False)
    assert acc64.stack().dtype == np.float32 and bf16.stack().dtype == np.float32
    np.testing.assert_allclose(acc64.stack(), ref.stack(), rtol=1e-5, atol=1e-5)
    assert np.isfinite(bf16.stack()).all()
    err = np.abs(bf16.stack() - ref.stack()).max() / np.abs(ref.stack()).max()
    assert 0 < err < 0.1  # bf16 rounding is visible but small


# ------------------------------------------------------------------------------------ tokenizers


def test_same_tokenizer_check(tiny_model):
    gpt2 = AutoTokenizer.from_pretrained(tiny_model("gpt2"))
    gpt2_left = AutoTokenizer.from_pretrained(tiny_model("gpt2", padding_side="left"))
    llama = AutoTokenizer.from_pretrained(tiny_model("llama", seed=1))
    bert = AutoTokenizer.from_pretrained(tiny_model("bert"))
    assert same_tokenizer(gpt2, gpt2_left) and same_tokenizer(gpt2, llama)  # same vocabulary and rules
    assert tokenizer_fingerprint(gpt2) != tokenizer_fingerprint(bert)
    check_same_tokenizer(gpt2, llama)
    with pytest.raises(UserError, match="same tokenizer"):
        check_same_tokenizer(bert, gpt2)


# ------------------------------------------------------------------------------------ streaming moments


def test_extract_moments_matches_stored_features(tiny_model):
    """Streaming teacher/student features into LayerMoments gives the same metric matrices as moments
    built from the full extracted feature matrices in one update."""
    from repsim.measures.moments import LayerMoments

    t, s = str(tiny_model("bert")), str(tiny_model("bert", seed=1))
    texts = TEXTS * 3
    streamed = extract_moments(t, s, texts, batch_size=4, progress=False)
    ta = extract(t, texts, cache=False, progress=False)
    sa = extract(s, texts, cache=False, progress=False)
    full = LayerMoments([ta.width] * len(ta), [sa.width] * len(sa))
    full.update([torch.as_tensor(np.asarray(a)) for a in ta], [torch.as_tensor(np.asarray(a)) for a in sa])
    assert streamed.n == len(texts)
    for metric in ("procrustes[distance]", "cka[linear,biased]", "gram_frobenius"):
        np.testing.assert_allclose(streamed.matrix(metric), full.matrix(metric), rtol=1e-5, atol=1e-6)


def test_extract_moments_tokens_needs_same_tokenizer(tiny_model):
    with pytest.raises(UserError, match="same tokenizer"):
        extract_moments(str(tiny_model("bert")), str(tiny_model("gpt2")), TEXTS, pool="tokens", progress=False)
    m = extract_moments(str(tiny_model("gpt2")), str(tiny_model("llama")), TEXTS, pool="tokens", batch_size=4,
                        progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model("gpt2"))
    assert m.n == sum(len(tok(t)["input_ids"]) for t in TEXTS)


# ------------------------------------------------------------------------------------ real default models


@pytest.mark.real
@pytest.mark.parametrize("name,n_layers,width", [("all-MiniLM-L6-v2", 7, 384), ("all-mpnet-base-v2", 13, 768)])
def test_real_default_models_shapes(name, n_layers, width):
    """The embedded defaults load offline: MiniLM 6 blocks (7 hidden states) of width 384, MPNet 12 blocks
    (13) of width 768; post-norm encoders, so no final norm; every value finite."""
    from repsim.activations.data import load_texts

    data = load_texts("sst2", max_samples=24)
    acts = extract(name, data, batch_size=8, progress=False)
    assert acts.layers == list(range(n_layers)) and acts.width == width and acts.n == 24
    assert acts.meta["offline_default"] and acts.meta["final_norm"] is None
    stack = acts.stack()
    assert np.isfinite(stack).all() and stack.std() > 0
    tokens = extract(name, data.texts[:4], pool="tokens", layers=[-1], cache=False, progress=False)
    assert tokens.n == int(tokens.offsets[-1]) and np.isfinite(tokens[-1]).all()
