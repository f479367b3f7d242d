"""Loading models: the one loader (:func:`load_model`), handles that know a model before its weights load, and
fingerprints of loaded weights.

A *model spec* (hub id, short name, embedded default, local folder or ``.gguf`` file) is resolved to a local folder
by :func:`repsim.activations.assets.resolve_model`; :func:`load_model` loads it for a task. Extraction works with
:class:`LoadedModel` (model, tokenizer, name, revision) and :class:`ModelHandle` (the same, before the weights load:
enough for a cache key).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repsim.activations.assets import ModelSource, resolve_model
from repsim.system.devices import resolve_device, resolve_dtype
from repsim.system.errors import UserError, first_line

#: what a model can be loaded as: the backbone (hidden states), a causal LM, or a sequence classifier
TASKS = ("base", "causal-lm", "sequence-classification")


def set_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its eos token (else unk) as pad token; returns the tokenizer."""
    if getattr(tokenizer, "pad_token", None) is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    return tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own weight-loading progress bars and load reports (repsim shows its own progress;
    loading a causal-LM checkpoint as a backbone lists the unused head as "unexpected", which is intended)."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - transformers loads only with a model

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str | Path, *, task: str = "base", device: str | torch.device = "cpu", dtype: Any = "float32",
               device_map: str | dict | None = None, num_labels: int | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any, ModelSource]:
    """Load a model and its tokenizer from a spec (see :func:`repsim.activations.assets.resolve_model`), in eval mode.

    ``task``: ``"base"`` (``AutoModel``: the backbone, hidden states), ``"causal-lm"`` (``AutoModelForCausalLM``)
    or ``"sequence-classification"`` (backbone plus a freshly initialised head with ``num_labels`` outputs,
    default 2; ``config.pad_token_id`` is set from the tokenizer). ``dtype``: a name or torch dtype
    (:func:`repsim.system.devices.resolve_dtype`) or ``"auto"`` (the checkpoint's). ``device_map`` (e.g.
    ``"auto"``) is passed to ``from_pretrained`` and then ``device`` is not applied. A tokenizer without a pad
    token gets its eos token (or unk) as pad token. Returns ``(model, tokenizer, source)``.
    """
    import transformers  # noqa: PLC0415 - transformers loads only with a model
    from transformers import (  # noqa: PLC0415 - transformers only when a model is loaded
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    classes = {"base": AutoModel, "causal-lm": AutoModelForCausalLM,
               "sequence-classification": AutoModelForSequenceClassification}
    if task not in classes:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if num_labels is not None and task != "sequence-classification":
        raise UserError("num_labels only applies to task='sequence-classification'")
    torch_dtype = dtype if dtype == "auto" else resolve_dtype(dtype)
    target = None if device_map is not None else resolve_device(device)
    source = resolve_model(spec, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot load the tokenizer of {source.name!r} from {source.path}: {first_line(exc)}") from exc
    set_pad_token(tokenizer)
    if task == "sequence-classification":
        kwargs["num_labels"] = 2 if num_labels is None else int(num_labels)
    try:
        with quiet_transformers():
            model = classes[task].from_pretrained(source.path, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot load {source.name!r} from {source.path} as {task}: {first_line(exc)}") from exc
    if task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if target is not None:
        model.to(target)
    model.eval()
    return model, tokenizer, source


def hidden_width(model: torch.nn.Module) -> int:
    """Width of a model's hidden states (``config.hidden_size``)."""
    return int(model.config.hidden_size)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a loaded model's parameter and buffer names, dtypes, shapes and bytes (for models passed as
    objects, which have no file to hash)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- handles


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    revision: str
    offline_default: bool = False


def as_loaded(model: Any, *, device: torch.device, dtype: torch.dtype,
              device_map: str | dict | None = None) -> LoadedModel:
    """Resolve ``model`` to (model, tokenizer, name, revision).

    ``model`` is a spec string (hub id, local folder, embedded default: loaded by :func:`load_model`), a
    :class:`LoadedModel`, or a ``(model, tokenizer)`` pair of objects (its revision is a weights hash, computed
    when a cache key needs it).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        m, tok = model
        name = getattr(getattr(m, "config", None), "_name_or_path", "") or type(m).__name__
        return LoadedModel(m.eval(), tok, str(name), "")
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"model must be a spec string, a folder, or a (model, tokenizer) pair; got {type(model)}")
    m, tok, src = load_model(str(model), task="base", dtype=dtype, device=device, device_map=device_map)
    return LoadedModel(m, tok, str(src.name), str(src.revision), bool(src.offline_default))


@dataclass
class ModelHandle:
    """A model known well enough for a cache key (name, revision, tokenizer, config) before its weights load."""

    spec: Any
    name: str
    revision: str | None
    tokenizer: Any
    config: Any
    offline_default: bool = False
    loaded: LoadedModel | None = None

    def load(self, *, device: torch.device, dtype: torch.dtype, device_map: str | dict | None = None
             ) -> LoadedModel:
        """The loaded model, with THIS handle's tokenizer (the one the cache key was computed from)."""
        if self.loaded is None:
            lm = as_loaded(self.spec, device=device, dtype=dtype, device_map=device_map)
            self.loaded = LoadedModel(lm.model, self.tokenizer, self.name, self.revision or lm.revision,
                                      self.offline_default)
        return self.loaded


def prepare_model(model: Any) -> ModelHandle:
    """Resolve a model spec to name, revision, tokenizer and config WITHOUT loading weights (a cache hit then
    costs a tokenizer load). ``(model, tokenizer)`` pairs are used as they are; their revision (a weights
    hash) is computed only when the cache needs it."""
    if isinstance(model, LoadedModel):
        return ModelHandle(model, model.name, model.revision, model.tokenizer, model.model.config,
                           model.offline_default, model)
    if isinstance(model, tuple) and len(model) == 2:
        m, tok = model
        name = str(getattr(getattr(m, "config", None), "_name_or_path", "") or type(m).__name__)
        lm = LoadedModel(m.eval(), set_pad_token(tok), name, "")
        return ModelHandle(model, name, None, lm.tokenizer, m.config, False, lm)
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"model must be a spec string, a folder, or a (model, tokenizer) pair; got {type(model)}")
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415 - transformers loads only with a model

    src = resolve_model(str(model))
    path = Path(src.path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the tokenizer/config of {src.name!r} from {path}: {first_line(exc)}") from exc
    return ModelHandle(str(model), str(src.name), str(src.revision), set_pad_token(tok), config,
                       bool(src.offline_default))


__all__ = ["TASKS", "LoadedModel", "ModelHandle", "as_loaded", "hidden_width", "load_model", "model_fingerprint",
           "prepare_model", "quiet_transformers", "set_pad_token"]
