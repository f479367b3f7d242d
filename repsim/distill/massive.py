"""Massive activations at the first token (Sun et al. 2024, "Massive activations in large language models") and
the first-token mask of token-level feature losses.

Many decoders (LLaMA-family models such as SmolLM2, OPT, GPT-2) put a hidden state of enormous norm on the first
token of every text from the early blocks on, hundreds of times the median token norm (SmolLM2's measured
ratios: docs/distillation.md). A token-level geometry loss centres and scales the rows of a batch jointly, so these few
rows dominate it: the other tokens' geometry hardly enters the value or the gradient. ``first_token="mask"``
leaves each text's first real token (position 0 under right padding, the first non-pad position under left
padding) out of the feature loss; ``"auto"`` does so when :func:`first_token_norm_ratios` finds massive
activations on the teacher (ratio > :data:`MASSIVE_RATIO` at any mapped layer) and says so with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from repsim.distill.config import FIRST_TOKEN_MODES
from repsim.distill.data import Encoded, collate
from repsim.system.errors import UserError

#: ratio (first-token norm / median norm of the other tokens) above which ``first_token="auto"`` masks
MASSIVE_RATIO = 20.0


def drop_first_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """The (batch, tokens) mask with each row's first real token set to 0 (the first 1 of the row, so right and
    left padding alike); rows and dtype otherwise unchanged."""
    real = attention_mask != 0
    first = real & (real.long().cumsum(dim=1) == 1)
    return attention_mask * (~first).to(attention_mask.dtype)


@torch.no_grad()
def first_token_norm_ratios(model: nn.Module, encoded: Encoded, layers: Sequence[int], pad_id: int, *,
                            padding_side: str = "right", max_texts: int = 32, batch_size: int = 8,
                            device: torch.device | str | None = None) -> dict[int, float]:
    """Per layer k: median over texts of ‖h_k(first real token)‖₂ divided by the median of ‖h_k‖₂ over every other
    real token, on the first ``max_texts`` texts of ``encoded`` (eval mode, ``batch_size`` texts at a time).

    Layer k is ``hidden_states[k]`` (0 = embeddings). A ratio near 1 means the first token is an ordinary token;
    massive activations give ratios in the hundreds. NaN when no text has a second token."""
    if not layers:
        return {}
    n = min(len(encoded), max_texts)
    if n == 0:
        raise UserError("no texts to measure first-token norms on")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    first: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    rest: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    try:
        for start in range(0, n, batch_size):
            batch = collate(encoded, list(range(start, min(n, start + batch_size))), pad_id, padding_side)
            mask = batch["attention_mask"].to(device)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
            others = drop_first_token(mask) != 0
            is_first = (mask != 0) & ~others
            for k in layers:
                norms = out.hidden_states[k].float().norm(dim=-1)
                first[k].append(norms[is_first].cpu())
                rest[k].append(norms[others].cpu())
    finally:
        model.train(was_training)
    ratios = {}
    for k in layers:
        tail = torch.cat(rest[k])
        ratios[int(k)] = (float(torch.cat(first[k]).median() / tail.median()) if tail.numel() else float("nan"))
    return ratios


def massive_layers(ratios: dict[int, float], threshold: float = MASSIVE_RATIO) -> list[int]:
    """The layers whose first-token ratio (:func:`first_token_norm_ratios`) exceeds ``threshold``."""
    return [k for k, r in ratios.items() if r > threshold]


def resolve_first_token(mode: str, teacher: nn.Module, encoded: Encoded, layers: Sequence[int], pad_id: int, *,
                        padding_side: str = "right", device: torch.device | str | None = None,
                        ) -> tuple[bool, dict[int, float]]:
    """Whether the feature loss leaves out each text's first token, and the teacher's ratios (measured for
    ``"auto"`` only, else empty). ``"auto"`` masks when any mapped layer's ratio exceeds :data:`MASSIVE_RATIO`
    and then warns (UserWarning, one line)."""
    if mode not in FIRST_TOKEN_MODES:
        raise UserError(f"unknown first_token {mode!r}; choose one of {', '.join(FIRST_TOKEN_MODES)}")
    if mode != "auto":
        return mode == "mask", {}
    ratios = first_token_norm_ratios(teacher, encoded, sorted(set(layers)), pad_id, padding_side=padding_side,
                                     device=device)
    hit = massive_layers(ratios)
    if hit:
        named = ", ".join(f"{ratios[k]:.0f}× at layer {k}" for k in hit)
        warnings.warn(f"massive activations on the teacher's first token (norm {named} the median token norm; "
                      f"threshold {MASSIVE_RATIO:g}×): the feature loss leaves each text's first token out "
                      "(first_token='auto'; first_token='keep' keeps it)", UserWarning, stacklevel=3)
    return bool(hit), ratios

