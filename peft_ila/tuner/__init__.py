"""The PEFT tuner: `ILAConfig` (config.py), the adapter layer and gate bank (layer.py), `ILAModel` (model.py: which
modules carry adapters, probe -> selected, mixed-adapter batches), `add_weighted_adapter`'s combinations (weighted.py),
`Selection` and its saved forms (selection.py), full fine-tuning of a selection (full.py), sampled layerwise training
(layerwise.py), LoRA ranks re-allocated by importance (ranks.py), backward stopping at the lowest adapted block
(backward.py), and the one module that touches peft internals (_peft_compat.py). Importing this package registers
the PEFT type "ILA". It imports nothing from `identification` or `app`."""

from ._peft_compat import ILA as PEFT_TYPE
from ._peft_compat import register
from .config import ILAConfig, resolve_top_k
from .full import (
    load_changed_weights,
    load_selection,
    lora_parameter_count,
    save_with_selection,
    top_within_parameters,
    train_only_selected,
)
from .layer import GateBank, ILALayer, Linear
from .layerwise import LayerSampler, LayerwiseConfig, block_groups, block_importance
from .model import ILAModel, find_candidates
from .ranks import allocate_ranks, importance_lora_config
from .selection import FieldError, ILALoadError, Selection, model_identity

register(ILAConfig, ILAModel)

__all__ = [
    "PEFT_TYPE",
    "FieldError",
    "GateBank",
    "ILAConfig",
    "ILALayer",
    "ILALoadError",
    "ILAModel",
    "LayerSampler",
    "LayerwiseConfig",
    "Linear",
    "Selection",
    "allocate_ranks",
    "block_groups",
    "block_importance",
    "find_candidates",
    "importance_lora_config",
    "load_changed_weights",
    "load_selection",
    "lora_parameter_count",
    "model_identity",
    "resolve_top_k",
    "save_with_selection",
    "top_within_parameters",
    "train_only_selected",
]
