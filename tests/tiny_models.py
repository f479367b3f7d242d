"""Tiny randomly initialised Hugging Face models with offline tokenizers, for unit tests.

`make_tiny_model(kind, path)` writes a model folder (config, weights, tokenizer) loadable with
`AutoModel.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`, with no network.
Kinds: "bert" (encoder, right padding, [CLS]), "opt", "gpt2", "llama" (decoders; padding side chosen by caller).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a an movie film is was good bad great terrible funny boring and but not very really quite "
    "plot acting story characters long short it this that i loved hated of to in with for on at by "
    "scene music ending beginning slow fast beautiful ugly smart dull charming awful"
).split()

HIDDEN = 32
LAYERS = 3


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ",", "!", "?"])}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", padding_side="right", model_max_length=64,
    )


def _word_tokenizer(padding_side: str) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [".", ",", "!", "?"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side=padding_side, model_max_length=64,
    )
    return tok


def make_tiny_model(kind: str, path: str | Path, *, seed: int = 0, padding_side: str = "right",
                    hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """Write a tiny random `kind` model with its tokenizer to `path` and return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "bert":
        tok = _bert_tokenizer()
        cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64)
        model = BertModel(cfg)
    else:
        tok = _word_tokenizer(padding_side)
        common = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=2, eos_token_id=3)
        if kind == "opt":
            cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, ffn_dim=2 * hidden,
                            max_position_embeddings=64, word_embed_proj_dim=hidden, **common)
            model = OPTForCausalLM(cfg)
        elif kind == "gpt2":
            cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **common)
            model = GPT2LMHeadModel(cfg)
        elif kind == "llama":
            cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                              **common)
            model = LlamaForCausalLM(cfg)
        else:
            raise ValueError(f"unknown tiny model kind {kind!r}")
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
