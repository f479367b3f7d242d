"""The first-token mask of token-level feature losses and the massive-activation detector (repsim.distill.massive).

Facts: with ``first_token="mask"`` the trainer's feature term equals the slow formulas on the real token rows with
each text's first real token removed by hand, and sends exactly zero gradient to that token's student hidden
state; with ``"keep"`` it equals the all-token value; ``"auto"`` masks and warns exactly when the teacher's
first-token norm is massive (injected here by a hook that scales position 0 after the first block).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from slow_formulas import slow_gram_frobenius, slow_linear_cka, slow_procrustes_distance
from transformers import AutoModelForCausalLM, AutoTokenizer

import repsim.distill as D
from repsim.distill.data import collate
from repsim.system.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the movie was good", "a really boring film with bad acting", "it is great", "the plot was slow and the ending "
    "was awful", "i loved this film", "charming", "a very long and dull story", "smart funny and beautiful music",
]
CONFIG = D.DistillConfig(task="causal-lm", features="tokens", loss="procrustes", layer_map="2:1,3:2", epochs=1,
                         batch_size=8, lr=1e-3, max_length=16, progress=False, cache_teacher=False)
SLOW = {"procrustes": slow_procrustes_distance, "gram_frobenius": slow_gram_frobenius,
        "cka": lambda X, Y: 1.0 - slow_linear_cka(X, Y)}


def _models(tiny_model, kind, padding_side="right"):
    path = tiny_model(kind, padding_side=padding_side)
    teacher, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    student, s_tok = D.make_student("drop:2", teacher, tok, "causal-lm", None, seed=0)
    return teacher, student, tok


def _trainer(teacher, student, tok, **changes):
    cfg = dataclasses.replace(CONFIG, **changes)
    return D.DistillTrainer(teacher, student, tok, D.encode(tok, TEXTS, None, cfg.max_length), cfg,
                            teacher_tokenizer=tok, train_texts=TEXTS)


def _slow_feature(trainer, loss, drop_first):
    """Σ over mapped pairs of the slow formula on the real token rows (each row's first real token removed by hand
    when ``drop_first``), from a separate forward pass of both models."""
    batch = collate(trainer.train, list(range(len(TEXTS))), trainer.pad_id, trainer.padding_side)
    with torch.no_grad():
        t_out = trainer.teacher(**batch, output_hidden_states=True)
        s_out = trainer.student(**batch, output_hidden_states=True)
    rows = []
    for j, row_mask in enumerate(batch["attention_mask"].tolist()):
        real = [i for i, m in enumerate(row_mask) if m]
        rows += [(j, i) for i in (real[1:] if drop_first else real)]
    total = 0.0
    for t, s in trainer.layer_map:
        X = np.stack([t_out.hidden_states[t][j, i].double().numpy() for j, i in rows])
        Y = np.stack([s_out.hidden_states[s][j, i].double().numpy() for j, i in rows])
        total += SLOW[loss](X, Y)
    return total


def _feature(trainer):
    trainer.student.eval()  # no dropout: the same hidden states as the slow pass
    return float(trainer._loss_terms(list(range(len(TEXTS))))["feature"].detach())


@pytest.mark.parametrize("kind,padding_side", [("llama", "right"), ("gpt2", "right"), ("opt", "right"),
                                               ("llama", "left"), ("opt", "left")])
@pytest.mark.parametrize("loss", ["procrustes", "cka", "gram_frobenius"])
def test_masked_and_kept_feature_terms_equal_slow_formulas(tiny_model, kind, padding_side, loss):
    teacher, student, tok = _models(tiny_model, kind, padding_side)
    masked = _trainer(teacher, student, tok, loss=loss, first_token="mask")
    kept = _trainer(teacher, student, tok, loss=loss, first_token="keep")
    assert masked.mask_first_token and not kept.mask_first_token
    value_masked, value_kept = _feature(masked), _feature(kept)  # float32 scalars: rel 1e-6
    assert value_masked == pytest.approx(_slow_feature(masked, loss, drop_first=True), rel=1e-6)
    assert value_kept == pytest.approx(_slow_feature(kept, loss, drop_first=False), rel=1e-6)
    assert abs(value_masked - value_kept) > 1e-6 * value_kept  # the mask changes which rows enter


@pytest.mark.parametrize("kind,padding_side", [("llama", "right"), ("gpt2", "left")])
def test_masked_first_token_gets_exactly_zero_feature_gradient(tiny_model, kind, padding_side):
    """The last mapped student layer is the model's output, so its first-token hidden state reaches the feature
    term only through the loss itself: masked, its gradient is exactly 0; kept, it is not."""
    teacher, student, tok = _models(tiny_model, kind, padding_side)
    grads = {}
    for mode in ("mask", "keep"):
        trainer = _trainer(teacher, student, tok, first_token=mode, layer_map="3:2")
        trainer.student.eval()
        forward, kept = trainer.student.forward, {}

        def retaining(*args, _forward=forward, _kept=kept, **kwargs):
            out = _forward(*args, **kwargs)
            out.hidden_states[-1].retain_grad()
            _kept["h"] = out.hidden_states[-1]
            return out

        trainer.student.forward = retaining
        index = list(range(len(TEXTS)))
        trainer._loss_terms(index)["feature"].backward()
        mask = collate(trainer.train, index, trainer.pad_id, trainer.padding_side)["attention_mask"]
        first = mask.argmax(dim=1)  # the first real token of each row
        grads[mode] = kept["h"].grad[torch.arange(len(index)), first]
        assert kept["h"].grad[mask.bool()].abs().sum() > 0
    assert torch.count_nonzero(grads["mask"]) == 0
    assert torch.count_nonzero(grads["keep"]) > 0


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(6, 8), st.booleans())
def test_drop_first_token_zeroes_exactly_the_first_real_token(lengths, width, left):
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for j, n in enumerate(lengths):
        if left:
            mask[j, width - n:] = 1
        else:
            mask[j, :n] = 1
    expected = mask.clone()
    for j in range(len(lengths)):
        expected[j, mask[j].tolist().index(1)] = 0
    out = D.drop_first_token(mask)
    assert out.dtype == mask.dtype and torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------- detection


def _massive_hook(teacher, scale):
    """Scale the first position of block 0's output, as block 1 reads it (the first real token under right padding),
    by ``scale``."""

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, 0] *= scale
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return teacher.model.layers[0].register_forward_hook(hook)


def test_detector_finds_injected_massive_activations_and_nothing_without(tiny_model):
    teacher, _student, tok = _models(tiny_model, "llama")
    encoded = D.encode(tok, TEXTS, None, 16)
    plain = D.first_token_norm_ratios(teacher, encoded, [0, 1, 2, 3], tok.pad_token_id)
    assert D.massive_layers(plain) == [] and max(plain.values()) < 3
    handle = _massive_hook(teacher, 500.0)
    try:
        boosted = D.first_token_norm_ratios(teacher, encoded, [0, 1, 2, 3], tok.pad_token_id)
    finally:
        handle.remove()
    assert boosted[0] == pytest.approx(plain[0], rel=1e-6)  # the embeddings come before the hook
    # the scaled state enters block 1, so hidden_states[2] carries it (transformers records hidden_states[1] before
    # this hook runs); the final norm of hidden_states[3] undoes it, as in SmolLM2's last layer
    assert boosted[2] > 50 * plain[2] and D.massive_layers(boosted) == [2]


def test_detector_ratio_against_hand_computed_norms(tiny_model):
    teacher, _student, tok = _models(tiny_model, "gpt2")
    encoded = D.encode(tok, TEXTS, None, 16)
    ratios = D.first_token_norm_ratios(teacher, encoded, [2], tok.pad_token_id, batch_size=3)
    firsts, others = [], []
    with torch.no_grad():
        for ids in encoded.input_ids:  # one text at a time: no padding at all
            h = teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
            norms = h.double().norm(dim=-1).tolist()
            firsts.append(norms[0])
            others += norms[1:]
    # right padding: a causal model's real tokens never see the pads, so batched norms equal unbatched ones
    assert ratios[2] == pytest.approx(float(torch.tensor(firsts).median() / torch.tensor(others).median()), rel=1e-5)


def test_auto_masks_and_warns_with_massive_activations(tiny_model):
    teacher, student, tok = _models(tiny_model, "llama")
    handle = _massive_hook(teacher, 500.0)
    try:
        with pytest.warns(UserWarning, match=r"massive activations .*\(norm \d+× at layer 2 the median") as caught:
            trainer = _trainer(teacher, student, tok, first_token="auto")
    finally:
        handle.remove()
    assert len([w for w in caught if "massive" in str(w.message)]) == 1
    assert "\n" not in str(caught[0].message)
    assert trainer.mask_first_token and trainer.first_token_ratios[2] > D.MASSIVE_RATIO


def test_auto_leaves_an_ordinary_model_alone_without_a_warning(tiny_model):
    teacher, student, tok = _models(tiny_model, "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = _trainer(teacher, student, tok, first_token="auto")
    assert not trainer.mask_first_token
    assert set(trainer.first_token_ratios) == {2, 3} and max(trainer.first_token_ratios.values()) < D.MASSIVE_RATIO


def test_mean_features_never_measure_or_mask(tiny_model):
    teacher, student, tok = _models(tiny_model, "llama")
    handle = _massive_hook(teacher, 500.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            trainer = _trainer(teacher, student, tok, features="mean", first_token="auto")
    finally:
        handle.remove()
    assert not trainer.mask_first_token and trainer.first_token_ratios == {}


def test_bad_first_token_settings_are_user_errors():
    with pytest.raises(UserError, match="first_token"):
        dataclasses.replace(CONFIG, first_token="yes").validate()
    with pytest.raises(UserError, match="token-level"):
        dataclasses.replace(CONFIG, features="mean", first_token="mask").validate()


def test_cli_flag_reaches_the_config():
    from repsim.cli import build_parser

    args = build_parser().parse_args(["distill", "t", "drop:1", "--features", "tokens", "--first-token", "keep"])
    assert args.first_token == "keep"
    assert build_parser().parse_args(["distill", "t", "drop:1"]).first_token == D.DistillConfig().first_token


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("first_token", ["keep", "mask"])
def test_classification_token_features_pair_each_real_token_under_either_padding(tiny_model, padding_side,
                                                                               first_token):
    """Classification caches the teacher's token features (computed right-padded, so each text's tokens start at
    row 0); a left-padded student batch must still pair token i of a text with the teacher's token i."""
    from transformers import AutoModelForSequenceClassification

    path = tiny_model("llama", padding_side=padding_side)
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    student, _ = D.make_student("drop:2", teacher, tok, "sequence-classification", 2, seed=0)
    labels = [i % 2 for i in range(len(TEXTS))]
    cfg = dataclasses.replace(CONFIG, task="sequence-classification", first_token=first_token)
    trainer = D.DistillTrainer(teacher, student, tok, D.encode(tok, TEXTS, labels, cfg.max_length), cfg,
                               teacher_tokenizer=tok, train_texts=TEXTS)
    value = _feature(trainer)
    batch = collate(trainer.train, list(range(len(TEXTS))), trainer.pad_id, padding_side)
    with torch.no_grad():
        s_hidden = trainer.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True).hidden_states
        t_hidden = [teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
                    for ids in trainer.train.input_ids]  # each text alone: the teacher's own token states
    expected = 0.0
    for t, s in trainer.layer_map:
        X, Y = [], []
        for j, row_mask in enumerate(batch["attention_mask"].tolist()):
            real = [i for i, m in enumerate(row_mask) if m]
            for k, i in enumerate(real):
                if k == 0 and first_token == "mask":
                    continue
                X.append(t_hidden[j][t][0, k].double().numpy())
                Y.append(s_hidden[s][j, i].double().numpy())
        expected += slow_procrustes_distance(np.stack(X), np.stack(Y))
    assert value == pytest.approx(expected, rel=1e-5)
