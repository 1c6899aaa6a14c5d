"""Full fine-tuning of an ILA selection: the selected layers' own weights train, nothing else, and no adapter.

The result is a plain `transformers` checkpoint (`save_pretrained`, safetensors) that `AutoModelForCausalLM`
loads as it is, with the selection beside it in `ila_mask.safetensors` (the mask tensors of `Selection.to_tensors`),
so which layers were tuned, and why, stays known. Or, `changed_only`, just the tensors that training changed, in
`ila_changed.safetensors`, which `load_changed_weights` puts back into the base model they were trained from.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import written_atomically
from .selection import Selection, layer_of, weights_fingerprint

MASK_FILE = "ila_mask.safetensors"
CHANGED_FILE = "ila_changed.safetensors"  # the selected layers' tensors only (`changed_only`)


def selected_parameters(model: nn.Module, selection: Selection) -> dict[str, nn.Parameter]:
    """The parameters of the selected layers (a module: its weight and bias; a block: all of its parameters) by
    name, in model order. `ValueError` naming a selected layer the model does not have."""
    modules = dict(model.named_modules())
    missing = [name for name in selection.selected if name not in modules]
    if missing:
        raise ValueError(
            f"the model has no module {missing[0]!r} ({len(missing)} of {len(selection.selected)} selected layers "
            "missing): the selection was found on another model."
        )
    chosen = set(selection.selected)
    owned = {}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in chosen or layer_of(owner, "block") in chosen:
            owned[name] = p
    return owned


def lora_parameter_count(model: nn.Module, names: Iterable[str], r: int) -> int:
    """The parameters LoRA of rank `r` trains on the linear modules `names`: r x (in + out features) each."""
    return sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in names)


def top_within_parameters(model: nn.Module, selection: Selection, max_params: int) -> Selection:
    """The most important layers (in `selection.ranking` order) whose own weights together hold at most
    `max_params` parameters, a layer too large for what is left skipped: full fine-tuning sized to a budget, e.g.
    the trainable parameters of LoRA on every layer, whose gradients and AdamW moments it then matches. The rest
    of the ranking follows by score. `ValueError` when not even one layer fits."""
    sizes = {name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in selection.ranking}
    chosen, used = [], 0
    for name in selection.ranking:
        if used + sizes[name] <= max_params:
            chosen.append(name)
            used += sizes[name]
    if not chosen:
        raise ValueError(
            f"no layer fits in {max_params} parameters (the smallest holds {min(sizes.values())}): raise the budget."
        )
    return Selection(selection.candidates, tuple(chosen), selection.scores, provenance=selection.provenance)


def train_only_selected(model: nn.Module, selection: Selection) -> list[nn.Parameter]:
    """Freeze every parameter of `model` except those of the selected layers (`selected_parameters`) and return
    those, in model order. Nothing below the lowest of them needs a gradient, so autograd stops there."""
    owned = selected_parameters(model, selection)
    for name, p in model.named_parameters():
        p.requires_grad_(name in owned)
    return list(owned.values())


def save_with_selection(
    model: nn.Module, selection: Selection, directory: str | os.PathLike, changed_only: bool = False
) -> None:
    """`model.save_pretrained(directory)` (safetensors) and the selection's mask tensors in `MASK_FILE` beside it.
    `changed_only`: instead of the checkpoint, only the selected layers' tensors, in `CHANGED_FILE`, with a
    fingerprint of every other parameter (the base model they apply to; see `load_changed_weights`). Each file is
    written to a temporary name first, so that it is whole or absent."""
    directory = Path(directory)
    if changed_only:
        directory.mkdir(parents=True, exist_ok=True)
        owned = selected_parameters(model, selection)
        tensors = {name: p.detach().contiguous() for name, p in owned.items()}
        metadata = {"format": "pt", "base_fingerprint": _fingerprint_without(model, owned)}
        _save_atomic(tensors, directory / CHANGED_FILE, metadata)
    else:
        model.save_pretrained(directory)
    _save_atomic(selection.to_tensors(), directory / MASK_FILE)


def load_changed_weights(model: nn.Module, directory: str | os.PathLike) -> Selection:
    """Put the tensors a `changed_only` save wrote into `model`, the base model they were trained from, in place;
    returns the selection. `ValueError`, before anything changes, when `model` lacks one of them, has another
    shape, or is not that base (a sampled fingerprint of every other parameter differs)."""
    path = Path(directory) / CHANGED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} was not saved with changed_only=True.")
    changed, selection = load_file(path), load_selection(directory)
    params = dict(model.named_parameters())
    wrong = [n for n, t in changed.items() if n not in params or params[n].shape != t.shape]
    if wrong:
        raise ValueError(
            f"{path} holds {wrong[0]!r}, which this model lacks or holds with another shape: load the base model "
            "the fine-tune started from."
        )
    with safe_open(path, framework="pt") as saved:
        expected = (saved.metadata() or {}).get("base_fingerprint")
    if _fingerprint_without(model, changed) != expected:
        raise ValueError(
            f"{path} was trained from other weights than this model's (the fingerprint of the parameters it left "
            "unchanged differs): load the base model the fine-tune started from."
        )
    with torch.no_grad():
        for name, tensor in changed.items():
            params[name].copy_(tensor)
    return selection


def _fingerprint_without(model: nn.Module, left_out: Container[str]) -> str:
    """`weights_fingerprint` of the parameters whose names are not in `left_out`: those a fine-tune kept."""
    return weights_fingerprint((n, p) for n, p in model.named_parameters() if n not in left_out)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with written_atomically(path) as partial:
        save_file(tensors, partial, metadata)


def load_selection(directory: str | os.PathLike) -> Selection:
    """The selection a full fine-tune was saved with (see `save_with_selection`)."""
    path = Path(directory) / MASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} was not saved by save_with_selection.")
    return Selection.from_tensors(load_file(path))
