"""Full fine-tuning of an ILA selection: the selected layers' own weights train, nothing else, and no adapter.

The result is a plain `transformers` checkpoint (`save_pretrained`, safetensors) that `AutoModelForCausalLM`
loads as it is, with the selection beside it in `ila_mask.safetensors` (the mask tensors of `Selection.to_tensors`),
so which layers were tuned, and why, stays known.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .selection import Selection, layer_of

MASK_FILE = "ila_mask.safetensors"


def train_only_selected(model: nn.Module, selection: Selection) -> list[nn.Parameter]:
    """Freeze every parameter of `model` except those of the selected layers (a module: its weight and bias; a
    block: all of its parameters) and return those, in model order. Nothing below the lowest of them needs a
    gradient, so autograd stops there. `ValueError` naming a selected layer the model does not have."""
    modules = dict(model.named_modules())
    missing = [name for name in selection.selected if name not in modules]
    if missing:
        raise ValueError(
            f"the model has no module {missing[0]!r} ({len(missing)} of {len(selection.selected)} selected layers "
            "missing): the selection was found on another model."
        )
    chosen = set(selection.selected)
    trainable = []
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        p.requires_grad_(owner in chosen or layer_of(owner, "block") in chosen)
        if p.requires_grad:
            trainable.append(p)
    return trainable


def save_with_selection(model: nn.Module, selection: Selection, directory: str | os.PathLike) -> None:
    """`model.save_pretrained(directory)` (safetensors) and the selection's mask tensors in `MASK_FILE` beside it,
    written to a temporary name first so that the file is whole or absent."""
    directory = Path(directory)
    model.save_pretrained(directory)
    partial = directory / f".{MASK_FILE}.partial"
    save_file(selection.to_tensors(), partial)
    os.replace(partial, directory / MASK_FILE)


def load_selection(directory: str | os.PathLike) -> Selection:
    """The selection a full fine-tune was saved with (see `save_with_selection`)."""
    path = Path(directory) / MASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} was not saved by save_with_selection.")
    return Selection.from_tensors(load_file(path))
