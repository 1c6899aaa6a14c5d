"""Every touch of peft internals lives here.

PEFT registers tuners with `peft.utils.register_peft_method`, which only accepts names that its `PeftType` enum
already lists. We add one member, `PeftType.ILA`, to that enum and then go through the public registration call.
The enum surgery is checked against the peft versions we test; if peft's internals move, importing `peft_ila`
fails here with a message that says so, instead of failing later in an obscure place. Where peft has no hook, two of
its functions are wrapped, acting on ILA configs only (`save_pretrained` refusing pickles, `PeftMixedModel`'s
compatibility check naming the alternatives), and LoRA's private helpers for mixed-adapter batches are re-exported.
"""

from __future__ import annotations

import enum
import functools
import inspect
import warnings

import peft
from packaging.version import Version
from peft.tuners.lora.model import _adapter_names_pre_forward_hook as adapter_names_pre_forward_hook  # noqa: F401
from peft.tuners.lora.model import _get_encoder as get_encoder  # noqa: F401

TESTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [low, high)
PEFT_TYPE_NAME = "ILA"
PREFIX = "ila_"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
# PEFT's own words for a merge that gives non-finite weights (LoRA's), so code that matches them catches ILA's too
NAN_MERGE_MESSAGE = "NaNs detected in the merged weights. The adapter {adapter} seems to be broken"


def _fail(what: str) -> ImportError:
    low, high = TESTED_PEFT
    return ImportError(
        f"peft-ila cannot register its tuner with peft {peft.__version__}: {what}. "
        f"peft-ila is tested with peft>={low},<{high}; install that with `pip install 'peft>={low},<{high}'`."
    )


def _extend_peft_type(name: str) -> enum.Enum:
    """Add `name` to `peft.utils.PeftType` (idempotent) and return the member."""
    from peft.utils import peft_types

    peft_type = getattr(peft_types, "PeftType", None)
    if not (isinstance(peft_type, enum.EnumMeta) and issubclass(peft_type, str)):
        raise _fail("peft.utils.peft_types.PeftType is no longer a str Enum")
    if name in peft_type.__members__:
        return peft_type[name]
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(peft_type, attr):
            raise _fail(f"PeftType lacks the enum internal {attr}")

    member = str.__new__(peft_type, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = peft_type
    member._sort_order_ = len(peft_type._member_names_)
    peft_type._member_map_[name] = member
    peft_type._value2member_map_[name] = member
    peft_type._member_names_.append(name)
    type.__setattr__(peft_type, name, member)

    if peft_type(name) is not member or name not in list(peft_type) or peft_type[name] is not member:
        raise _fail("adding a member to PeftType did not take effect")
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Register the ILA config and tuner with peft; calling it again (e.g. after a reload) rebinds the classes."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    if ILA in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[ILA] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[ILA] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[ILA] = PREFIX
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    _refuse_pickle_saves()
    _refuse_mixed_models()


def _refuse_pickle_saves() -> None:
    """`PeftModel.save_pretrained(..., safe_serialization=False)` refuses, before writing anything, when an adapter it
    would save is ILA's: peft-ila loads weights only from safetensors, so a pickle it wrote could not be loaded back.
    peft has no hook before the directory and model card are written, so its method is wrapped (once)."""
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "_refuses_ila_pickles", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        names = bound.arguments["selected_adapters"] or list(self.peft_config)
        if not bound.arguments["safe_serialization"] and any(
            self.peft_config[n].peft_type == ILA for n in names if n in self.peft_config
        ):
            raise ValueError(
                "ILA adapters are saved only as safetensors (peft-ila never loads a pickle); call "
                "save_pretrained without safe_serialization=False."
            )
        return original(self, *args, **kwargs)

    save_pretrained._refuses_ila_pickles = True
    PeftModel.save_pretrained = save_pretrained


def _refuse_mixed_models() -> None:
    """`get_peft_model(..., mixed=True)` and `PeftMixedModel.add_adapter` refuse an ILA config with the alternatives
    (peft's own refusal names no way out). peft checks compatibility in one module-level function, wrapped here."""
    from peft import mixed_model

    original = mixed_model._check_config_compatible
    if getattr(original, "_refuses_ila", False):
        return

    @functools.wraps(original)
    def check_config_compatible(peft_config) -> None:
        if getattr(peft_config, "peft_type", None) == ILA:
            raise ValueError(
                "PeftMixedModel cannot hold ILA adapters (peft mixes only its own adapter types); to combine an ILA "
                "adapter with LoRA-family ones, export it as LoRA (`peft-ila export-lora ADAPTER OUT`) and mix that, "
                "or keep several ILA adapters in one PeftModel (add_adapter, set_adapter, add_weighted_adapter)."
            )
        original(peft_config)

    check_config_compatible._refuses_ila = True
    mixed_model._check_config_compatible = check_config_compatible


if not TESTED_PEFT[0] <= Version(peft.__version__) < TESTED_PEFT[1]:
    warnings.warn(
        f"peft-ila is tested with peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]} but found peft {peft.__version__}; "
        "the registration checks passed, but report any problem together with your peft version.",
        stacklevel=2,
    )
ILA = _extend_peft_type(PEFT_TYPE_NAME)
