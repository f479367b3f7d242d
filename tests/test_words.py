"""Word-level rows (`--pool words`): the word rule, sub-token means checked by hand on three tokenizer kinds
(WordPiece, byte-level BPE, Unigram/SentencePiece-style), truncation, padding, the streamed comparison against
the in-memory one, and the errors (different tokenizers under --pool tokens, slow tokenizers, row-hungry measures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertTokenizerFast, GPT2TokenizerFast, PreTrainedTokenizerFast

import repsim.activations.extract as extract_module
import repsim.analysis.comparison as comparison
from repsim.activations.data import TextData
from repsim.activations.extract import extract
from repsim.activations.pooling import pool_words
from repsim.activations.words import encode_words, split_words, words
from repsim.analysis.comparison import Comparison, compare
from repsim.system.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def wordpiece() -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able", "cafe", "!", ",", "'", "-",
             "don", "t", "state", "of", "the", "art", "日", "本", "good"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)


def byte_bpe() -> GPT2TokenizerFast:
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *sorted(ByteLevel.alphabet())])}
    merges = [("Ġ", "g"), ("o", "o"), ("Ġg", "oo"), ("Ġgoo", "d"), ("c", "a"), ("ca", "f")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    return GPT2TokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def unigram() -> PreTrainedTokenizerFast:
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("▁", -2.0), ("▁good", -1.0), ("▁caf", -1.5), ("é", -2.0), ("!", -2.0),
              ("日", -2.0), ("本", -2.0), ("go", -3.0), ("od", -3.0)]
    core = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>", bos_token="<s>")


def word_means(tok, texts, max_length=64, seed=0):
    """(hidden (b, T, 3), the batch's word rows, counts, tokens per text) for random hidden states."""
    enc, plan = encode_words(tok, texts, max_length)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*enc["input_ids"].shape, 3, generator=gen, dtype=torch.float64)
    rows = pool_words(hidden, plan, torch.float64)
    toks = [tok.convert_ids_to_tokens(ids) for ids in enc["input_ids"].tolist()]
    return hidden, rows, plan[2], toks


# ------------------------------------------------------------------------------------------- the word rule


def test_word_rule_on_punctuation_unicode_and_emoji():
    text = "Don't stop—state-of-the-art café (cafe\u0301) 3.5 日本語 テスト 👍🏽 x_y \"hi.\" rock'n'roll -x"
    assert words(text) == ["Don't", "stop", "—", "state-of-the-art", "café", "(", "cafe\u0301", ")", "3", ".", "5",
                           "日", "本", "語", "テスト", "👍🏽", "x", "_", "y", '"', "hi", ".", '"', "rock'n'roll",
                           "-", "x"]
    assert split_words("  a  bc ") == [(2, 3), (5, 7)]
    assert split_words(" \t\n") == []


# ------------------------------------------------------------------------------------------- hand-computed means


def test_wordpiece_word_means_by_hand():
    text = "Unbelievable café, don't 日本! state-of-the-art 👍"
    hidden, rows, counts, toks = word_means(wordpiece(), [text])
    assert toks[0] == ["[CLS]", "un", "##believ", "##able", "cafe", ",", "don", "'", "t", "日", "本", "!", "state",
                       "-", "of", "-", "the", "-", "art", "[UNK]", "[SEP]"]
    # words: Unbelievable café , don't 日 本 ! state-of-the-art 👍 → token positions (by hand, [CLS] = 0)
    groups = [[1, 2, 3], [4], [5], [6, 7, 8], [9], [10], [11], list(range(12, 19)), [19]]
    assert words(text) == ["Unbelievable", "café", ",", "don't", "日", "本", "!", "state-of-the-art", "👍"]
    assert counts.tolist() == [len(g) for g in groups]
    for w, g in enumerate(groups):
        torch.testing.assert_close(rows[w], hidden[0, g].mean(0), rtol=1e-12, atol=0)


def test_byte_level_bpe_word_means_by_hand():
    text = "café good 日👍!"
    hidden, rows, counts, toks = word_means(byte_bpe(), [text])
    # é is two bytes, 日 three, 👍 four; the lone "Ġ" before 日 has an empty span and belongs to no word
    assert toks[0] == ["caf", "Ã", "©", "Ġgood", "Ġ", "æ", "Ĺ", "¥", "ð", "Ł", "ĳ", "į", "!"]
    groups = [[0, 1, 2], [3], [5, 6, 7], [8, 9, 10, 11], [12]]
    assert words(text) == ["café", "good", "日", "👍", "!"]
    assert counts.tolist() == [3, 1, 3, 4, 1]
    for w, g in enumerate(groups):
        torch.testing.assert_close(rows[w], hidden[0, g].mean(0), rtol=1e-12, atol=0)


def test_unigram_word_means_by_hand_and_the_bos_token_is_excluded():
    text = "café good! 日本"
    hidden, rows, counts, toks = word_means(unigram(), [text])
    assert toks[0] == ["<s>", "▁caf", "é", "▁good", "!", "▁", "日", "本"]
    # "▁good" spans the space before "good" too: it overlaps only the word "good"; "▁" alone overlaps nothing
    groups = [[1, 2], [3], [4], [6], [7]]
    assert counts.tolist() == [2, 1, 1, 1, 1]
    for w, g in enumerate(groups):
        torch.testing.assert_close(rows[w], hidden[0, g].mean(0), rtol=1e-12, atol=0)


def test_a_token_spanning_two_words_counts_in_both():
    tok = byte_bpe()  # a byte-level BPE with one more merge: a single token covers "a!"
    vocab = dict(tok.get_vocab())
    vocab["a!"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "!")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no split at "!"
    two = GPT2TokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hidden, rows, counts, toks = word_means(two, ["a!"])
    assert toks[0] == ["a!"] and words("a!") == ["a", "!"]
    assert counts.tolist() == [1, 1]
    torch.testing.assert_close(rows[0], hidden[0, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(rows[1], hidden[0, 0], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- truncation, padding


@pytest.mark.parametrize(("max_length", "kept"), [
    (6, [3, 1, 0, 0]),  # [CLS] un ##believ ##able cafe [SEP]: the comma and "don't" are cut
    (5, [3, 0, 0, 0]),  # café's token is cut
    (4, [0, 0, 0, 0]),  # "Unbelievable" keeps 2 of its 3 tokens: dropped, not averaged over a part
])
def test_truncated_words_are_dropped_not_partly_averaged(max_length, kept):
    _, _, counts, _ = word_means(wordpiece(), ["Unbelievable café, don't"], max_length=max_length)
    assert counts.tolist() == kept


def test_truncation_inside_a_multibyte_character_drops_the_word():
    # 👍 is four byte tokens sharing one character span: at max_length 5 it keeps two of them
    _, _, counts, toks = word_means(byte_bpe(), ["good👍"], max_length=5)
    assert toks[0] == ["g", "oo", "d", "ð", "Ł"]
    assert counts.tolist() == [3, 0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_changes_a_word_row(side):
    tok = wordpiece()
    tok.padding_side = side
    long, short = "Unbelievable café, don't 日本! state-of-the-art", "good!"
    enc, plan = encode_words(tok, [long, short], 64)
    hidden = torch.randn(*enc["input_ids"].shape, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = pool_words(hidden, plan, torch.float64)
    enc1, plan1 = encode_words(tok, [short], 64)
    real = enc["attention_mask"][1].bool()
    rows1 = pool_words(hidden[1:2, real], plan1, torch.float64)  # the same states without the padding
    n_long = len(split_words(long))
    torch.testing.assert_close(rows[n_long:], rows1, rtol=1e-12, atol=0)
    assert plan[2][n_long:].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------- extraction and compare


def _texts() -> TextData:
    base = ["the movie was good.", "a very boring plot, but great music!", "i loved it",
            "state-of-the-art café 日本 👍", "not funny and not smart", "it was long, slow and dull"]
    return TextData(base * 3, None, "words-test", "test")


def test_extract_words_store_equals_memory_and_offsets_are_word_counts(tiny_model):
    data = _texts()
    stored = extract(str(tiny_model("bert")), data, pool="words", progress=False, max_length=8)
    again = extract(str(tiny_model("bert")), data, pool="words", progress=False, max_length=8)
    memory = extract(str(tiny_model("bert")), data, pool="words", progress=False, max_length=8, cache=False)
    assert again.meta["cache_hit"] is True
    counts = [len(split_words(t)) for t in data.texts]
    assert np.array_equal(stored.offsets, np.concatenate([[0], np.cumsum(counts)]))
    assert np.array_equal(stored.token_ids, memory.token_ids)
    assert stored.meta["n_words_dropped"] == int((memory.token_ids == 0).sum()) > 0  # max_length 8 cuts words
    for k in stored.layers:
        assert np.array_equal(stored[k], memory[k])


def test_word_level_comparison_streams_to_the_in_memory_values_and_self_is_identity(tiny_model):
    bert, gpt2 = str(tiny_model("bert")), str(tiny_model("gpt2", seed=1, hidden=16, layers=2))
    data = _texts()
    comp = compare(bert, gpt2, data, pool="words", max_length=12)
    t = extract(bert, data, pool="words", progress=False, max_length=12)
    s = extract(gpt2, data, pool="words", progress=False, max_length=12)
    keep = t.kept & s.kept
    assert comp.meta["words"]["n_used"] == int(keep.sum()) and comp.meta["words"]["dropped"] == int((~keep).sum())
    assert 0 < int(keep.sum()) < len(keep)
    ref = Comparison.from_layers([np.asarray(t[k])[keep] for k in t.layers], [np.asarray(s[k])[keep] for k in s.layers],
                                 comp.metrics, teacher_layer_ids=t.layers, student_layer_ids=s.layers)
    for m in comp.metrics:
        # the student's last layer is GPT-2's final LayerNorm at unit gain and zero bias: its rows sum to zero, so
        # its centred rank is q - 1 up to float32 rounding, where the in-sample residual is ill-posed (each engine's
        # rank cutoff decides); the residual is compared on the other student layers
        cols = slice(None) if "projection" not in m else slice(0, -1)
        np.testing.assert_allclose(comp.matrix(m)[:, cols], ref.matrix(m)[:, cols], rtol=1e-6, atol=1e-9)
    no_cache = compare(bert, gpt2, data, pool="words", max_length=12, cache=False)
    for m in comp.metrics:
        np.testing.assert_allclose(no_cache.matrix(m), comp.matrix(m), rtol=1e-6, atol=1e-9)
    self_comp = compare(bert, bert, data, pool="words")
    assert np.allclose(np.diag(self_comp.matrix("procrustes")), 0.0, atol=1e-6)
    assert np.allclose(np.diag(self_comp.matrix("cka")), 1.0, rtol=1e-9, atol=0)
    assert np.allclose(np.diag(self_comp.matrix("gram_frobenius")), 0.0, atol=1e-6)


def test_pool_tokens_with_different_tokenizers_refuses_before_extracting(tiny_model, monkeypatch):
    def no_extraction(*a, **k):
        raise AssertionError("extracted although the tokenizers differ")

    monkeypatch.setattr(extract_module, "extract", no_extraction)
    monkeypatch.setattr(comparison, "extract", no_extraction)
    with pytest.raises(UserError, match="`pool='words'`"):
        compare(str(tiny_model("bert")), str(tiny_model("gpt2")), _texts(), pool="tokens")


def test_slow_tokenizer_gets_an_error_naming_the_fast_one(tiny_model):
    from transformers import AutoModel, ByT5Tokenizer

    slow = ByT5Tokenizer()
    assert not slow.is_fast
    model = AutoModel.from_pretrained(str(tiny_model("bert")))
    with pytest.raises(UserError, match="use_fast=True"):
        extract((model, slow), ["a b"], pool="words", progress=False, cache=False)


def test_measures_that_need_rows_are_refused_at_word_level(tiny_model):
    pair = str(tiny_model("bert")), str(tiny_model("gpt2"))
    for bad in (["cka[rbf,sigma=1]"], ["projection_residual[folds=5]"]):
        with pytest.raises(UserError, match="in memory"):
            compare(*pair, _texts(), pool="words", metrics=bad)
    with pytest.raises(UserError, match="`bootstrap`"):
        compare(*pair, _texts(), pool="words", bootstrap=10)
    with pytest.raises(UserError, match="unknown pooling"):
        compare(*pair, _texts(), pool="sentences")

