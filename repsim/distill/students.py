"""Teachers and students as models: loading with the task's head, whether a head is trained, and model surgery
(``drop:N`` keeps evenly spaced blocks, ``narrow:HIDDEN:LAYERS`` builds a smaller random model of the teacher's
architecture)."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from repsim.activations.layers import num_layers
from repsim.activations.models import load_model
from repsim.system.errors import UserError


def load(spec: str, task: str, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """A model and its tokenizer through :func:`repsim.activations.models.load_model` (hub id, short name or local
    folder)."""

    kwargs: dict[str, Any] = {"task": task}
    if task == "sequence-classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    model, tokenizer, _source = load_model(str(spec), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def has_trained_head(model: nn.Module, task: str) -> bool:
    """True when the checkpoint was saved with the task's head (config.architectures names it).

    A base encoder (``BertModel``, sentence-transformers folders) loaded for sequence classification gets a new,
    random head: it must be fine-tuned before it can teach.
    """
    suffix = "ForSequenceClassification" if task == "sequence-classification" else "ForCausalLM"
    archs = getattr(model.config, "architectures", None) or []
    return any(str(a).endswith(suffix) or (task == "causal-lm" and str(a).endswith("LMHeadModel")) for a in archs)


def _block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) that holds the transformer blocks."""
    n = num_layers(model, required=True)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise UserError(f"cannot find the list of {n} blocks in {type(model).__name__} to drop layers from")


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the blocks ``keep`` (0-based block indices, in order); embeddings, head kept."""
    n = num_layers(model, required=True)
    keep = list(keep)
    if not keep or any(not 0 <= k < n for k in keep) or sorted(set(keep)) != keep:
        raise UserError(f"layers to keep must be increasing block indices in 0..{n - 1}, got {keep}")
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)  # the teacher may be frozen; its copy trains
    parent, attr, blocks = _block_list(student)
    kept = nn.ModuleList([blocks[k] for k in keep])
    setattr(parent, attr, kept)
    for new_index, block in enumerate(kept):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[k] for k in keep]
    return student


def narrow_model(teacher: nn.Module, hidden: int, layers: int, seed: int) -> nn.Module:
    """A randomly initialised model of the teacher's architecture with width ``hidden`` and ``layers`` blocks.

    Heads: hidden // 64 when that divides (at least 1), else the largest divisor of ``hidden`` ≤ the teacher's
    head count; feed-forward width scaled by hidden / teacher hidden. The vocabulary (and tokenizer) is the teacher's.
    """
    cfg = copy.deepcopy(teacher.config)
    t_hidden = int(cfg.hidden_size)
    if hidden < 8 or layers < 1:
        raise UserError(f"narrow student needs width ≥ 8 and ≥ 1 layer, got {hidden}:{layers}")
    t_heads = int(getattr(cfg, "num_attention_heads", 1))
    heads = max(1, hidden // 64) if hidden % 64 == 0 else max(h for h in range(1, t_heads + 1) if hidden % h == 0)
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = layers
    cfg.num_attention_heads = heads
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = heads
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = hidden // heads
    for ffn in ("intermediate_size", "ffn_dim"):
        if getattr(cfg, ffn, None):
            setattr(cfg, ffn, max(1, int(round(getattr(cfg, ffn) * hidden / t_hidden))))
    if getattr(cfg, "word_embed_proj_dim", None):
        cfg.word_embed_proj_dim = hidden
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list):
        cfg.layer_types = layer_types[:layers] if len(layer_types) >= layers else [layer_types[0]] * layers
    torch.manual_seed(seed)
    return type(teacher)(cfg)


def make_student(spec: str, teacher: nn.Module, teacher_tokenizer: Any, task: str, num_labels: int | None,
                 seed: int) -> tuple[nn.Module, Any]:
    """Build the student from ``spec``.

    - ``drop:N``: keep N of the teacher's blocks, evenly spaced and including the last (N=3 of 6 keeps blocks
      2, 4, 6, i.e. every 2nd); ``drop:1,3,5`` keeps those 1-based blocks. Weights (and head) copied from the teacher.
    - ``narrow:HIDDEN:LAYERS``: random initialisation of the teacher's architecture, width HIDDEN, LAYERS blocks.
    - anything else: a hub id or local folder, loaded with a new head when it has none (seeded).
    Derived students share the teacher's tokenizer.
    """
    if spec.startswith("drop:"):
        arg = spec[len("drop:"):]
        n = num_layers(teacher, required=True)
        if re.fullmatch(r"\d+", arg):
            k = int(arg)
            if not 1 <= k <= n:
                raise UserError(f"drop:{k}: the teacher has {n} blocks; keep between 1 and {n}")
            keep = sorted({int(round((i + 1) * n / k)) - 1 for i in range(k)})
        elif re.fullmatch(r"\d+(,\d+)*", arg):
            keep = [int(x) - 1 for x in arg.split(",")]
            if any(not 0 <= b < n for b in keep):
                raise UserError(f"{spec}: blocks are numbered 1..{n}")
        else:
            raise UserError(f"bad student spec {spec!r}: use drop:N or drop:i,j,k (1-based blocks)")
        return drop_layers(teacher, keep), teacher_tokenizer
    if spec.startswith("narrow:"):
        m = re.fullmatch(r"narrow:(\d+):(\d+)", spec)
        if not m:
            raise UserError(f"bad student spec {spec!r}: use narrow:HIDDEN:LAYERS, e.g. narrow:192:3")
        return narrow_model(teacher, int(m.group(1)), int(m.group(2)), seed), teacher_tokenizer
    torch.manual_seed(seed)
    return load(spec, task, num_labels)
