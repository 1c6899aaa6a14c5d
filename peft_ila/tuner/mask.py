"""Layer names and the layer mask as tensors, as stored in `adapter_model.safetensors`.

A *layer* is what ILA scores: a module name such as `model.layers.7.self_attn.q_proj` (granularity "module") or a
block name such as `model.layers.7` (granularity "block"). The saved mask covers the ordered list of candidate
layers with three tensors:

- `base_model.ila_layer_names`: uint8 [n_bytes], the UTF-8 bytes of the candidate names joined by newlines;
- `base_model.ila_layer_mask`: bool [n_candidates], True where the layer carries an adapter;
- `base_model.ila_layer_scores`: float32 [n_candidates], the score in [0, 1] (the learned gate by default), NaN where
  none is known.
"""

from __future__ import annotations

import math
import re

import torch

NAMES_KEY = "base_model.ila_layer_names"
MASK_KEY = "base_model.ila_layer_mask"
SCORES_KEY = "base_model.ila_layer_scores"
MASK_KEYS = (NAMES_KEY, MASK_KEY, SCORES_KEY)


class ILALoadError(ValueError):
    """A saved ILA adapter does not fit the model it is loaded into, or its files disagree with each other."""


_FIRST_INDEX = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")


def layer_of(module_name: str, granularity: str) -> str:
    """The layer a module belongs to: itself, or for "block" its name up to its first numeric part."""
    if granularity == "module":
        return module_name
    match = _FIRST_INDEX.match(module_name)
    return match.group(1) if match else module_name


def mask_to_tensors(
    candidates: list[str], selected: list[str] | None, scores: dict[str, float] | None
) -> dict[str, torch.Tensor]:
    """Encode the mask over `candidates`; `selected=None` (probe state) marks every candidate as adapted."""
    if any(not name or "\n" in name for name in candidates):
        raise ValueError("ILA layer names cannot be empty or contain a newline.")
    chosen = set(candidates if selected is None else selected)
    scores = scores or {}
    return {
        NAMES_KEY: torch.tensor(list("\n".join(candidates).encode("utf-8")), dtype=torch.uint8),
        MASK_KEY: torch.tensor([name in chosen for name in candidates], dtype=torch.bool),
        SCORES_KEY: torch.tensor([scores.get(name, math.nan) for name in candidates], dtype=torch.float32),
    }


def tensors_to_mask(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str], dict[str, float]]:
    """Decode (candidates, adapted layers in candidate order, known scores); raise `ValueError` if inconsistent."""
    missing = [key for key in MASK_KEYS if key not in tensors]
    if missing:
        raise ValueError(
            f"the adapter weights lack the ILA mask tensors {missing}: the file was not written by peft-ila or "
            "was altered; save the adapter again with peft-ila."
        )
    raw, mask, scores = (tensors[key].detach().cpu() for key in MASK_KEYS)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError("the ILA mask tensors have the wrong dtype or shape; save the adapter again with peft-ila.")
    candidates = bytes(raw.tolist()).decode("utf-8").split("\n") if raw.numel() else []
    if not (len(candidates) == mask.numel() == scores.numel()):
        raise ValueError(
            f"the ILA mask tensors disagree: {len(candidates)} layer names, {mask.numel()} mask entries, "
            f"{scores.numel()} scores; the file is damaged, save the adapter again."
        )
    adapted = [name for name, keep in zip(candidates, mask.tolist(), strict=True) if keep]
    known = {name: float(s) for name, s in zip(candidates, scores.tolist(), strict=True) if not math.isnan(s)}
    return candidates, adapted, known
