"""Hugging Face model -> hidden states, pooled per text or kept per token.

Layer indexing (the same for every family; docs/activations.md §1, docs/pitfalls.md item 10):

* layer ``0`` is the embedding output (``hidden_states[0]`` in transformers: token + position embeddings,
  after the embedding LayerNorm where the family has one, e.g. BERT/MPNet);
* layer ``k`` (1 <= k <= L) is the output of transformer block ``k``, i.e. ``hidden_states[k]``;
* the LAST entry, ``L``, is what transformers returns as ``last_hidden_state``. For pre-norm decoders with a
  final norm that is ``final_norm(output of block L)``, not the raw block output:
  LLaMA / SmolLM2 / Mistral / Qwen (``model.norm``), OPT with ``do_layer_norm_before`` (``final_layer_norm``),
  GPT-2 (``ln_f``). Post-norm encoders (BERT, MiniLM, MPNet, RoBERTa) have no final norm: entry ``L`` is the
  raw output of block ``L``. ``Activations.meta["final_norm"]`` names the module applied to the last entry
  (``None`` when there is none). The tests check all of this against forward hooks.
* encoder-decoder models (T5, BART, ...): the ENCODER's hidden states, same convention.

Pooling (docs/activations.md §2) uses the attention mask: padding side and batch composition never leak into features:

* ``mean``: sum_t m_t h_t / sum_t m_t over real tokens (m = attention mask), accumulated in float32 or float64;
* ``cls``: the first real token (``[CLS]`` for BERT-like models; under left padding, the first non-pad position);
* ``last``: the last real token, found from the mask, correct under left or right padding;
* ``tokens``: every real token is one row; ``Activations.offsets[i]:offsets[i+1]`` are the rows of text ``i`` and
  ``Activations.token_ids`` the token ids of those rows. Rows of two models pair token by token only when both
  use the same tokenizer (:func:`check_same_tokenizer`).
* ``words``: every word of the text (the tokenizer-independent rule of :mod:`repsim.activations.words`) is one row,
the mean
  of the sub-tokens overlapping it (fast tokenizers' character offsets; special tokens excluded); ``offsets`` delimit
  the words of each text and ``token_ids`` holds the number of tokens averaged into each word, 0 for a word this
  model dropped (truncated by ``max_length``, or without any token). Rows of two models pair word by word whatever
  their tokenizers.

Batches are formed after sorting texts by token length (dynamic padding to the longest text of the batch);
results always come back in input order. With left padding (decoders configured for generation) position ids
are derived from the mask, so a left-padded text gets the same positions as the unpadded text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from repsim.activations import store
from repsim.activations.data import fingerprint_texts
from repsim.activations.layers import num_layers, num_layers_of_config, resolve_layers
from repsim.activations.models import LoadedModel, as_loaded, model_fingerprint, prepare_model
from repsim.activations.pooling import POOLS, check_pool, pool_hidden, pool_words
from repsim.activations.rows import Activations, rows_of
from repsim.activations.words import WORD_RULE, check_offsets, encode_words, word_counts
from repsim.measures.moments import LayerMoments
from repsim.moved import moved_name
from repsim.system.devices import MODEL_DTYPES, dist_info, dtype_name, resolve_device, resolve_dtype
from repsim.system.errors import UserError

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


# ---------------------------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 identifying what a tokenizer does to text: its vocabulary, normalisation, pre-tokenisation,
    post-processing (special tokens added) and special tokens. Padding/truncation settings are left out,
    since they do not change which ids a text becomes."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # the serialised tokenizer (deterministic), with padding and truncation switched off for the moment
        padding, truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        try:
            h.update(backend.to_str().encode())
        finally:
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when two tokenizers turn every text into the same ids (same vocabulary hash and rules)."""
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def check_same_tokenizer(a: Any, b: Any, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Refuse token-by-token pairing unless both tokenizers are identical (docs/pitfalls.md, item 12)."""
    if not same_tokenizer(a, b):
        raise UserError(
            f"`pool='tokens'` pairs tokens one by one and needs the same tokenizer on both sides, but the {names[0]} "
            f"and {names[1]} tokenizers differ; use `pool='words'` (sub-tokens averaged into shared words) or a "
            "pooled representation (`pool=mean|cls|last`)"
        )


# ---------------------------------------------------------------------------------------------- model structure


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the device of the input embeddings (first shard under ``device_map``)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def final_norm_name(model: torch.nn.Module) -> str | None:
    """Name of the final norm applied to the last hidden state (None for post-norm encoders like BERT)."""
    core = _core(model)
    for owner_name, owner in (("", core), ("decoder.", getattr(core, "decoder", None))):
        if owner is None or not isinstance(owner, torch.nn.Module):
            continue
        for n in FINAL_NORM_NAMES:
            mod = getattr(owner, n, None)
            if isinstance(mod, torch.nn.Module):
                return owner_name + n
    return None


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward yields the hidden states: encoder of an encoder-decoder, else the base model."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return getattr(model, "base_model", model)


# ---------------------------------------------------------------------------------------------- texts & batches


def as_texts(data: Any) -> tuple[list[str], str | None, str]:
    """(texts, fingerprint-from-data-or-None, name) from a TextData, a list of strings or a single string."""
    if isinstance(data, str):
        raise UserError("data must be a TextData (repsim.activations.data.load_texts) or a list of texts, "
                        "not one string")
    texts = getattr(data, "texts", data)
    try:
        texts = list(texts)
    except TypeError as exc:
        raise UserError(f"data must be a list of texts, got {type(data).__name__}") from exc
    if not texts:
        raise UserError("no texts to extract (empty data)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise UserError(f"data must contain strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts, getattr(data, "fingerprint", None), str(getattr(data, "name", "texts"))


def effective_max_length(tokenizer: Any, model: torch.nn.Module, max_length: int) -> int:
    """``max_length`` capped by the tokenizer's ``model_max_length`` when that is a real limit."""
    if int(max_length) < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return min(int(max_length), limit)
    return int(max_length)


def token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, int]:
    """Token count of each text after truncation to ``max_length``, and how many texts were truncated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False,
                        return_attention_mask=False, verbose=False)
    full = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))
    return np.minimum(full, max_length), int((full > max_length).sum())


def plan_batches(lengths: np.ndarray, batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Index arrays (into the input order) of each batch; sorted by decreasing length when ``sort``
    (stable, so ties keep input order). Longest first: an out-of-memory shows up at once."""
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------- forward


class Runner:
    """Runs one model batch by batch and yields its pooled hidden states for chosen layers."""

    def __init__(self, lm: LoadedModel, *, max_length: int, pool: str, accumulate: torch.dtype,
                 layers: list[int] | None):
        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.max_length = max_length
        self.pool = pool
        self.accumulate = accumulate
        self.layers = layers
        self.core = _core(self.model)
        self.device = model_device(self.model)
        params = inspect.signature(self.core.forward).parameters
        self._accepts_position_ids = "position_ids" in params
        self._accepts_use_cache = "use_cache" in params
        self.row_ids: np.ndarray | None = None
        if getattr(self.tok, "pad_token", None) is None:
            # decoders without a pad token: any id works, the mask hides it
            fallback = self.tok.eos_token or self.tok.unk_token
            if fallback is None:
                raise UserError("the tokenizer has no pad, eos or unk token to pad batches with")
            self.tok.pad_token = fallback

    @property
    def padding_side(self) -> str:
        return getattr(self.tok, "padding_side", "right")

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.inference_mode()
    def hidden_states(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True,
                              "return_dict": True}
        if self._accepts_use_cache:
            kw["use_cache"] = False
        if self.padding_side == "left" and self._accepts_position_ids and not getattr(
                self.model.config, "is_encoder_decoder", False):
            kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.core(**kw)
        hs = out.hidden_states if hasattr(out, "hidden_states") else out[-1]
        if hs is None:
            raise UserError(f"{self.lm.name}: the model returned no hidden states")
        return tuple(hs)

    def run(self, texts: Sequence[str]) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Pooled features {layer: (rows, w)} on CPU, the attention mask and input ids of the batch.

        Sets ``row_ids`` for pools with several rows per text: the token ids (``tokens``) or the number of tokens
        averaged into each word, 0 for a dropped word (``words``)."""
        plan = None
        if self.pool == "words":
            enc, plan = encode_words(self.tok, texts, self.max_length)
        else:
            enc = self.encode(texts)
        hs = self.hidden_states(enc)
        if self.layers is None:
            self.layers = list(range(len(hs)))
        bad = [k for k in self.layers if k >= len(hs)]
        if bad:
            raise UserError(f"unknown layer index {bad[0]}: this model has layers 0..{len(hs) - 1}")
        out = {}
        for k in self.layers:
            h = hs[k]
            if plan is not None:
                out[k] = pool_words(h, plan, self.accumulate)
            else:
                out[k] = pool_hidden(h, enc["attention_mask"].to(h.device), self.pool, self.accumulate)
        mask, ids = enc["attention_mask"], enc["input_ids"]
        self.row_ids = plan[2] if plan is not None else ids[mask.bool()].numpy() if self.pool == "tokens" else None
        return out, mask, ids

    def run_batches(self, texts: Sequence[str], batches: Sequence[np.ndarray], *, progress: bool,
                    desc: str, on_batch: Callable[[int], None] | None = None, done: int = 0
                    ) -> Iterator[tuple[int, np.ndarray, dict[int, np.ndarray], np.ndarray]]:
        """Yield (batch number, input indices, {layer: float32 rows}, real token ids) for each batch."""
        bar = _progress(sum(len(b) for b in batches) + done, desc, progress, initial=done)
        try:
            for j, idx in enumerate(batches):
                feats, mask, ids = self.run([texts[i] for i in idx])
                if on_batch is not None:
                    on_batch(j)
                tok_ids = self.row_ids
                yield j, idx, {k: v.to("cpu", torch.float32).numpy() for k, v in feats.items()}, tok_ids
                bar.update(len(idx))
        finally:
            bar.close()


# ---------------------------------------------------------------------------------------------- distributed


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, unit="text", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


# ---------------------------------------------------------------------------------------------- extract


def extract(
    model: Any,
    data: Any,
    *,
    layers: Sequence[int] | int | str | None = None,
    pool: str = "mean",
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    accumulate: str = "float32",
    device_map: str | dict | None = None,
    cache: bool = True,
    progress: bool = True,
    sort_by_length: bool = True,
    chunk_size: int = 1024,
    verify: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Activations:
    """Hidden states of ``model`` on ``data``, pooled per text (or per token), from the cache when present.

    model: spec string (hub id, local folder, embedded default name), or a ``(model, tokenizer)`` pair.
    data: :class:`repsim.activations.data.TextData` or a list of texts. layers: None (all, 0..L), ints, or "0,3,6".
    pool: mean | cls | last | tokens. dtype: the model's compute dtype (float32, bfloat16, float16); pooled
    features are accumulated in ``accumulate`` (float32 or float64) and stored as float32.
    cache: read/write the activation store (:mod:`repsim.activations.store`); ``False`` keeps everything in memory.
    device_map: passed to the loader (``"auto"`` spreads a big model over the available GPUs).
    Under ``torch.distributed`` each rank extracts its shard of the batches; every rank returns the whole result.
    chunk_size: texts per resumable chunk of a store entry. verify: check checksums of a cached entry
    (default: on the first open of an entry in this process).
    """
    t_start = time.perf_counter()
    pool = check_pool(pool)
    if accumulate not in ACCUMULATE:
        raise UserError(f"unknown accumulate dtype {accumulate!r}; use float32 or float64")
    texts, data_fp, data_name = as_texts(data)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, allowed=MODEL_DTYPES)
    if dev.type == "cpu" and torch_dtype == torch.float16 and device_map is None:
        warnings.warn("float16 on CPU is slow and may be inexact; consider bfloat16 or float32", stacklevel=2)
    t0 = time.perf_counter()
    handle = prepare_model(model)
    n_blocks = num_layers_of_config(handle.config)
    chosen = resolve_layers(layers, n_blocks)
    eff_len = effective_max_length(handle.tokenizer, None, max_length)
    lengths, n_trunc = token_lengths(handle.tokenizer, texts, eff_len)
    if n_trunc:
        warnings.warn(f"{n_trunc} of {len(texts)} texts are longer than max_length={eff_len} tokens and were "
                      "truncated", stacklevel=2)
    if (lengths == 0).any():
        raise UserError(f"text {int(np.argmax(lengths == 0))} has no tokens; remove empty texts from the data")
    rows_per_text = lengths
    if pool == "words":
        check_offsets(handle.tokenizer, handle.name)
        rows_per_text = word_counts(texts)
    if cache and handle.revision is None:
        handle.revision = "sha256:" + model_fingerprint(handle.loaded.model)
    meta: dict[str, Any] = {
        "model": handle.name, "revision": handle.revision, "offline_default": handle.offline_default,
        "tokenizer": tokenizer_fingerprint(handle.tokenizer),
        "padding_side": getattr(handle.tokenizer, "padding_side", "right"),
        "data": data_name, "data_fingerprint": data_fp or fingerprint_texts(texts),
        "texts_sha256": fingerprint_texts(texts), "n_texts": len(texts), "pool": pool,
        "max_length": eff_len, "n_truncated": n_trunc, "n_tokens": int(lengths.sum()),
        "layers": chosen, "num_layers": n_blocks, "model_type": getattr(handle.config, "model_type", None),
        "dtype": dtype_name(torch_dtype), "accumulate": accumulate, "storage_dtype": "float32",
        "batch_size": int(batch_size), "sort_by_length": bool(sort_by_length),
        "transformers": transformers_version(),
        # how the features were computed, beyond the cache key: a cache hit reports the build's values
        "built_with": {"batch_size": int(batch_size), "sort_by_length": bool(sort_by_length),
                       "dtype": dtype_name(torch_dtype), "accumulate": accumulate, "storage_dtype": "float32",
                       "device": str(dev) if device_map is None else f"device_map={device_map}",
                       "world_size": dist_info()[1], "torch": torch.__version__,
                       "transformers": transformers_version()},
    }
    if pool == "words":
        meta.update(word_rule=WORD_RULE, n_words=int(rows_per_text.sum()))
    t_prepare = time.perf_counter() - t0
    load_s = [0.0]

    def make_runner() -> Runner:
        """Load the weights (only when features must be computed) and set up the batched forward."""
        t1 = time.perf_counter()
        lm = handle.load(device=dev, dtype=torch_dtype, device_map=device_map)
        load_s[0] = time.perf_counter() - t1
        meta["final_norm"] = final_norm_name(lm.model)
        meta["model_class"] = type(lm.model).__name__
        return Runner(lm, max_length=eff_len, pool=pool, accumulate=ACCUMULATE[accumulate], layers=chosen)

    batches = plan_batches(lengths, batch_size, sort_by_length)
    full = list(range(n_blocks + 1)) if n_blocks is not None else None
    sources = superset_rows(data, meta["texts_sha256"])
    found = None
    if cache:
        if sources:  # where these texts sit in the lists they were drawn from, for later subsets
            meta["drawn_from"] = [{"fingerprint": fp, "n_texts": n, "rows_mask": store.rows_mask(rows, n)}
                                  for fp, n, rows in sources]
        if chosen is not None and (chosen != full or sources):
            # an entry with more layers, or of a larger text list these texts were drawn from, serves them
            found = store.find_superset(meta, sources, verify)
    if found is not None:
        acts = subset_of(found[0], chosen, found[1], meta)
    elif cache:
        acts = store.get_or_build(meta, texts, rows_per_text, make_runner, batches, progress=progress,
                                  chunk_size=chunk_size, verify=verify, on_batch=on_batch)
    else:
        acts = _extract_in_memory(make_runner(), texts, rows_per_text, batches, meta, progress, on_batch)
    if pool == "words":
        acts.meta["n_words_dropped"] = int((~acts.kept).sum())
    t_load = t_prepare + load_s[0]
    acts.meta.setdefault("timings", {})
    acts.meta["timings"]["load_s"] = t_load
    acts.meta["timings"]["total_s"] = time.perf_counter() - t_start
    return acts


def superset_rows(data: Any, texts_sha256: str) -> list[tuple[str, int, np.ndarray]]:
    """(texts_sha256, n_texts, rows) of the larger text lists ``data`` was drawn from (recorded by
    :func:`repsim.activations.data.subsample` in ``data.extra["supersets"]``): text j of ``data`` is text ``rows[j]``
    there.
    A record counts only when the fingerprint it was made for equals ``texts_sha256``, the hash of the texts now
    being extracted, so a changed text list never takes rows from a superset."""
    records = (getattr(data, "extra", None) or {}).get("supersets", [])
    return [(str(r["fingerprint"]), int(r["n_texts"]), np.asarray(r["rows"], dtype=np.int64)) for r in records
            if r.get("subset_fingerprint") == texts_sha256]


def subset_of(superset: Activations, layers: Sequence[int], rows: np.ndarray | None, meta: dict) -> Activations:
    """The ``layers`` of a cached ``superset`` entry and, when ``rows`` is given, only the texts at those rows (for
    pools with several rows per text, their rows through ``superset.offsets``), without a forward pass.

    ``meta`` is this request's own description (texts, counts); the arrays keep the superset's build facts
    (batch size, final norm). Row subsets are copied into memory; layer subsets stay memory-mapped."""
    own = {k: v for k, v in meta.items() if k not in ("batch_size", "sort_by_length", "built_with")}
    sub_meta = {**superset.meta, **own,
                "layers": list(layers), "cache_hit": True, "subset_of": superset.meta.get("key")}
    if rows is None:
        return Activations(list(layers), {k: superset.arrays[k] for k in layers}, sub_meta, superset.offsets,
                           superset.token_ids, superset.path)
    offsets = token_ids = None
    take = rows
    if superset.offsets is not None:
        take = rows_of(rows, np.asarray(superset.offsets))
        offsets = np.concatenate([[0], np.cumsum(np.diff(superset.offsets)[rows])]).astype(np.int64)
        token_ids = None if superset.token_ids is None else np.asarray(superset.token_ids[take])
    sub_meta["rows_of_superset"] = superset.n_texts
    return Activations(list(layers), {k: np.asarray(superset.arrays[k][take]) for k in layers}, sub_meta, offsets,
                       token_ids, superset.path)


def transformers_version() -> str:
    """The installed transformers version, read from its distribution metadata (importing it is slow, and
    a run served from the activation cache never needs it)."""

    return importlib.metadata.version("transformers")


def _extract_in_memory(runner: Runner, texts: list[str], lengths: np.ndarray, batches: list[np.ndarray],
                       meta: dict, progress: bool, on_batch) -> Activations:
    rank, world = dist_info()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) if not POOLS[runner.pool].per_text else None
    mine = list(range(rank, len(batches), world))
    t0 = time.perf_counter()
    results: dict[int, tuple[dict[int, np.ndarray], np.ndarray | None]] = {}
    for j, _idx, feats, tok_ids in runner.run_batches(texts, [batches[b] for b in mine], progress=progress,
                                               desc=f"extract {Path(meta['model']).name}", on_batch=on_batch):
        results[mine[j]] = (feats, tok_ids)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = {b: r for part in gathered for b, r in part.items()}
    layers = runner.layers or []
    widths = {k: next(iter(results.values()))[0][k].shape[1] for k in layers}
    rows = int(offsets[-1]) if offsets is not None else len(texts)
    arrays = {k: np.empty((rows, widths[k]), dtype=np.float32) for k in layers}
    token_ids = np.empty(rows, dtype=np.int64) if offsets is not None else None
    for b, (feats, tok_ids) in results.items():
        dest = rows_of(batches[b], offsets)
        for k in layers:
            arrays[k][dest] = feats[k]
        if token_ids is not None:
            token_ids[dest] = tok_ids
    meta = dict(meta, layers=layers, cache_hit=False, resumed_chunks=0, path=None,
                timings={"forward_s": time.perf_counter() - t0})
    return Activations(layers, arrays, meta, offsets, token_ids, None)


# ---------------------------------------------------------------------------------------------- streaming


def extract_moments(
    teacher: Any,
    student: Any,
    data: Any,
    *,
    layers: Sequence[int] | int | str | None = None,
    student_layers: Sequence[int] | int | str | None = None,
    pool: str = "mean",
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    accumulate: str = "float64",
    device_map: str | dict | None = None,
    progress: bool = True,
    moments_kwargs: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
    **unused: Any,
) -> Any:
    """Stream teacher and student features into :class:`repsim.measures.moments.LayerMoments`, storing nothing.

    Both models see the same batches of texts; memory depends on widths and batch size, not on the number of
    texts or tokens. ``pool="tokens"`` pairs tokens one by one and so needs identical tokenizers;
    ``pool="words"`` pairs words (:mod:`repsim.activations.words`) and streams only the words both models kept
    (``meta["n_words"]``, ``meta["n_words_used"]``).
    Under ``torch.distributed`` each rank streams its shard and the moments are summed with ``all_reduce``.
    ``layers`` selects teacher layers, ``student_layers`` student layers (default: same as ``layers`` when
    that is given as indices, else all). ``on_batch(rows_so_far)`` is called after each batch on this rank.
    """
    for k in ("cache",):
        unused.pop(k, None)
    if unused:
        raise TypeError(f"extract_moments got unexpected options {sorted(unused)}")
    pool = check_pool(pool)
    texts, data_fp, _ = as_texts(data)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, allowed=MODEL_DTYPES)
    acc = ACCUMULATE[accumulate]
    t_lm = as_loaded(teacher, device=dev, dtype=torch_dtype, device_map=device_map)
    s_lm = as_loaded(student, device=dev, dtype=torch_dtype, device_map=device_map)
    if pool == "tokens":
        check_same_tokenizer(t_lm.tokenizer, s_lm.tokenizer)
    if pool == "words":
        check_offsets(t_lm.tokenizer, "teacher")
        check_offsets(s_lm.tokenizer, "student")
    t_layers = resolve_layers(layers, num_layers(t_lm.model))
    s_layers = resolve_layers(student_layers if student_layers is not None else layers, num_layers(s_lm.model))
    t_len = effective_max_length(t_lm.tokenizer, t_lm.model, max_length)
    s_len = effective_max_length(s_lm.tokenizer, s_lm.model, max_length)
    if pool == "tokens":
        t_len = s_len = min(t_len, s_len)
    lengths, n_trunc = token_lengths(t_lm.tokenizer, texts, t_len)
    if n_trunc:
        warnings.warn(f"{n_trunc} of {len(texts)} texts are longer than max_length={t_len} tokens and were "
                      "truncated", stacklevel=2)
    t_run = Runner(t_lm, max_length=t_len, pool=pool, accumulate=acc, layers=t_layers)
    s_run = Runner(s_lm, max_length=s_len, pool=pool, accumulate=acc, layers=s_layers)
    if pool == "tokens" and t_run.padding_side != s_run.padding_side:
        s_run.tok.padding_side = t_run.padding_side
    batches = plan_batches(lengths, batch_size)
    rank, world = dist_info()
    mine = batches[rank::world]
    moments = None
    bar = _progress(sum(len(b) for b in mine), "moments", progress)
    n_rows = n_words = 0
    try:
        for idx in mine:
            chunk = [texts[i] for i in idx]
            t_feats, t_mask, t_ids = t_run.run(chunk)
            s_feats, s_mask, s_ids = s_run.run(chunk)
            if pool == "tokens" and not torch.equal(t_ids[t_mask.bool()], s_ids[s_mask.bool()]):
                raise UserError("teacher and student token ids differ on the same texts; cannot pair tokens")
            if pool == "words":
                both = torch.from_numpy((t_run.row_ids > 0) & (s_run.row_ids > 0))
                n_words += len(both)
                t_feats = {k: v[both.to(v.device)] for k, v in t_feats.items()}
                s_feats = {k: v[both.to(v.device)] for k, v in s_feats.items()}
            if moments is None:
                t_w = [t_feats[k].shape[1] for k in t_run.layers]
                s_w = [s_feats[k].shape[1] for k in s_run.layers]
                moments = LayerMoments(t_w, s_w, **(moments_kwargs or {}))
            rows = int(t_feats[t_run.layers[0]].shape[0])
            if rows:
                moments.update([t_feats[k] for k in t_run.layers], [s_feats[k] for k in s_run.layers])
            n_rows += rows
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(n_rows)
    finally:
        bar.close()
    if moments is None:  # this rank had no batches (more ranks than batches): widths from one probe batch
        t_feats, _, _ = t_run.run(texts[:1])
        s_feats, _, _ = s_run.run(texts[:1])
        moments = LayerMoments([t_feats[k].shape[1] for k in t_run.layers],
                               [s_feats[k].shape[1] for k in s_run.layers], **(moments_kwargs or {}))
    if world > 1:
        moments.all_reduce()
    with contextlib.suppress(AttributeError, TypeError):
        moments.meta = {"teacher": t_lm.name, "teacher_revision": t_lm.revision, "student": s_lm.name,
                        "student_revision": s_lm.revision, "teacher_layers": t_run.layers,
                        "student_layers": s_run.layers, "pool": pool, "n_texts": len(texts),
                        "data_fingerprint": data_fp or fingerprint_texts(texts), "n_truncated": n_trunc,
                        "max_length": t_len, "rows_this_rank": n_rows}
        if pool == "words":
            moments.meta.update(word_rule=WORD_RULE, n_words_this_rank=n_words, n_words_used_this_rank=n_rows)
    return moments


__all__ = [
    "Activations", "Runner", "check_same_tokenizer", "extract", "extract_moments", "final_norm_name",
    "same_tokenizer", "tokenizer_fingerprint", "transformers_version",
]


def __getattr__(name: str):  # noqa: ANN202
    """Names that moved to the plumbing's one home still resolve, with a DeprecationWarning (repsim/moved.py)."""
    return moved_name(__name__, name)
