"""The frozen teacher's logits and mapped features, computed once per (teacher weights, tokenised data, layers,
pooling) and cached on disk as safetensors, so every loss and seed of a grid reuses them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from repsim.activations.assets import cache_dir
from repsim.activations.models import model_fingerprint
from repsim.distill.data import Encoded, collate, pooled_mean
from repsim.system.files import atomic_file


def _cache_root() -> Path:
    return Path(cache_dir()) / "distill-teacher"


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, encoded: Encoded, teacher_layers: Sequence[int], features: str,
                    pad_id: int, *, batch_size: int = 64, device: torch.device | None = None,
                    cache: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """The frozen teacher's logits (n, classes) and mapped features, in data order.

    Features: ``feat{k}`` for each teacher layer k, (n, width) mean-pooled, or (n, T, width) token level padded to
    the longest text (rows beyond a text's length are zero). Cached as one safetensors file per key (teacher
    weights digest, tokenised-data digest, layers, pooling); written atomically.
    """
    device = device or next(teacher.parameters()).device
    layers = sorted(set(int(k) for k in teacher_layers))
    key_src = json.dumps({"model": f"{type(teacher).__name__}:{model_fingerprint(teacher)}",
                          "data": encoded.fingerprint, "layers": layers, "features": features, "v": 1})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = _cache_root() / f"{key}.safetensors" if cache else None
    if path is not None and path.exists():
        return load_file(str(path))
    teacher.eval()
    n = len(encoded)
    longest = max(len(r) for r in encoded.input_ids)
    logits, feats = [], {k: [] for k in layers}
    for start in tqdm(range(0, n, batch_size), desc="teacher outputs", disable=not progress, leave=False):
        index = list(range(start, min(n, start + batch_size)))
        batch = collate(encoded, index, pad_id)
        mask = batch["attention_mask"].to(device)
        out = teacher(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
        logits.append(out.logits.float().cpu())
        for k in layers:
            h = out.hidden_states[k].float()
            if features == "mean":
                feats[k].append(pooled_mean(h, mask).cpu())
            else:
                padded = torch.zeros(h.shape[0], longest, h.shape[-1])
                padded[:, : h.shape[1]] = (h * mask.unsqueeze(-1)).cpu()
                feats[k].append(padded)
    result = {"logits": torch.cat(logits)}
    result.update({f"feat{k}": torch.cat(v) for k, v in feats.items()})
    if path is not None:
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in result.items()}, tmp)
    return result
