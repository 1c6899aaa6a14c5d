"""peft-ila: ILA (Shi et al., arXiv 2410.17875) as a PEFT tuner.

`import peft_ila` registers the PEFT type "ILA", so `get_peft_model(model, ILAConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelFor*.from_pretrained` work with ILA adapters. Two wings: `tuner` (the
PEFT tuner) and `identification` (finding the important layers); the command line and its helpers are in `app`.
"""

from ._quiet_imports import without_unused_bitsandbytes_notice

with without_unused_bitsandbytes_notice():  # peft imports bitsandbytes, when installed, on its first import
    from .identification import ILACallback, ILAResult, LayerwiseCallback, identify_important_layers
    from .tuner import (
        PEFT_TYPE,
        FieldError,
        GateBank,
        ILAConfig,
        ILALayer,
        ILALoadError,
        ILAModel,
        LayerSampler,
        LayerwiseConfig,
        Linear,
        Selection,
        allocate_ranks,
        importance_lora_config,
        load_changed_weights,
        load_selection,
        lora_parameter_count,
        resolve_top_k,
        save_with_selection,
        top_within_parameters,
        train_only_selected,
    )

__version__ = "0.1.0"
__all__ = [
    "PEFT_TYPE",
    "FieldError",
    "GateBank",
    "ILACallback",
    "ILAConfig",
    "ILALayer",
    "ILALoadError",
    "ILAModel",
    "ILAResult",
    "LayerSampler",
    "LayerwiseCallback",
    "LayerwiseConfig",
    "Linear",
    "Selection",
    "allocate_ranks",
    "identify_important_layers",
    "importance_lora_config",
    "load_changed_weights",
    "load_selection",
    "lora_parameter_count",
    "resolve_top_k",
    "save_with_selection",
    "top_within_parameters",
    "train_only_selected",
]
