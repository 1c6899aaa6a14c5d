"""`ILAModel`: decides which modules carry ILA adapters, in the probe state and in the selected state."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils import _get_submodules
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._peft_compat import BASE_ADAPTER, PREFIX, adapter_names_pre_forward_hook, get_encoder
from .backward import InputGradRouter
from .config import ILAConfig, resolve_top_k
from .layer import GateBank, ILALayer, Linear
from .selection import SAVED_KEYS, FieldError, ILALoadError, Selection, _few, layer_of
from .weighted import combine_into, combined_rank


class ILAModel(BaseTuner):
    """Places ILA adapters on a model (see [`ILAConfig`]).

    *Probe state* (`config.selected_layers is None`): a gated adapter on every candidate layer; the gates live in
    `self.ila_gates[adapter]`, a [`GateBank`] over `self.ila_candidates[adapter]`. *Selected state*: plain adapters
    on the selected layers only; every other module is the base model's own object, untouched.

    Example:
        ```py
        >>> import peft_ila
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ila.ILAConfig(target_modules="all-linear", top_k=0.25))
        >>> result = peft_ila.identify_important_layers(model, batches)  # now only the top 25% carry adapters
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = ILALayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # no defaults: None means "all-linear"
    # The gate bank of the probe state lives here, but each gated layer holds its bank too, so the layers that
    # `inject_adapter_in_model` (and transformers' add_adapter/load_adapter) leave behind work on their own; only
    # identification needs this object, and it says so (`_ila_tuner`).
    uses_shared_state: bool = False

    # --- what to wrap -----------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: ILAConfig, model_config: dict) -> ILAConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = INCLUDE_LINEAR_LAYERS_SHORTHAND
        return peft_config

    def _find_candidates(self, model: nn.Module, config: ILAConfig) -> list[str]:
        return find_candidates(model, self._prepare_adapter_config(config, self.get_model_config(model)))

    def _check_target_module_exists(self, peft_config: ILAConfig, key: str) -> Any:
        found = check_target_module_exists(peft_config, key)
        if not found or peft_config.selected_layers is None:
            return found
        return layer_of(key, peft_config.granularity) in set(peft_config.selected_layers)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if "ila_candidates" not in self.__dict__:
            self.ila_candidates: dict[str, list[str]] = {}
            self.ila_gates = nn.ModuleDict()
            self._input_grads = InputGradRouter()
        config = self.peft_config[adapter_name]
        candidates = self._find_candidates(model, config)
        if config.selected_layers is None:
            resolve_top_k(config.top_k, len(candidates))
        else:
            try:
                _selection_of(config, candidates)
            except ValueError as exc:
                raise ILALoadError(
                    f"The ILAConfig does not fit this base model: {exc} Its candidate layers are: {_few(candidates)}. "
                    "The layers come from another model, or from other target_modules/granularity."
                ) from None
        self.ila_candidates[adapter_name] = candidates
        if config.selected_layers is None:
            bank = GateBank(len(candidates))
            if bank.logits.is_meta:  # low_cpu_mem_usage: gates are never loaded from a file, so make them real
                bank.to_empty(device=_device_of(model))
                nn.init.zeros_(bank.logits)
            self.ila_gates[adapter_name] = bank.to(_device_of(model))
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        except Exception:
            self.ila_candidates.pop(adapter_name, None)
            if adapter_name in self.ila_gates:
                del self.ila_gates[adapter_name]
            raise
        keep_4bit_layers_differentiable(model)

    def _create_and_replace(
        self,
        peft_config: ILAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        bank = self.ila_gates[adapter_name] if adapter_name in self.ila_gates else None  # noqa: SIM401 (no .get)
        index = None
        if bank is not None:
            index = self.ila_candidates[adapter_name].index(layer_of(current_key, peft_config.granularity))
        if isinstance(target, ILALayer):
            target.update_layer(adapter_name, peft_config, bank, index)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"ILA cannot adapt {current_key} ({type(base).__name__}): only nn.Linear and Conv1D.")
        new_module = Linear(target, adapter_name, peft_config, isinstance(base, Conv1D), bank, index)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # --- probe state -> selected state --------------------------------------------------------------------------

    def candidate_layers(self, adapter_name: str | None = None) -> list[str]:
        """The ordered candidate layers of an adapter (what the gates and the saved mask refer to)."""
        return list(self.ila_candidates[adapter_name or self._the_active_adapter()])

    def selection(self, adapter_name: str | None = None) -> Selection:
        """The adapter's [`Selection`]; in the probe state every candidate, unscored."""
        adapter_name = adapter_name or self._the_active_adapter()
        return _selection_of(self.peft_config[adapter_name], self.ila_candidates[adapter_name])

    def select_layers(
        self,
        selected: Selection | Sequence[str],
        scores: dict[str, float] | None = None,
        adapter_name: str | None = None,
        keep_weights: bool = False,
    ) -> None:
        """Switch an adapter from the probe to the selected state: adapters stay on the selected layers only.

        `selected` is a [`Selection`] over this adapter's candidates, or layer names (most important first) with
        optional `scores`. Other wrapped modules lose this adapter; a module left without adapters is replaced by its
        original base module. Kept adapters lose their gate and are re-initialised unless `keep_weights`.
        """
        adapter_name = adapter_name or self._the_active_adapter()
        config = self.peft_config[adapter_name]
        if config.selected_layers is not None:
            raise ValueError(f"ILA adapter '{adapter_name}' already has selected layers; start from a probe model.")
        candidates = tuple(self.ila_candidates[adapter_name])
        if not isinstance(selected, Selection):
            selected = Selection(candidates, tuple(selected), scores or {})
        elif selected.candidates != candidates:
            raise ValueError(
                f"the selection covers {len(selected.candidates)} candidate layers but adapter '{adapter_name}' has "
                f"{len(candidates)}: it was made for another model or other target_modules/granularity."
            )
        keep = set(selected.selected)
        for name, module in list(self.model.named_modules()):
            if not isinstance(module, ILALayer) or adapter_name not in module.ila_A:
                continue
            if module.merged:
                raise ValueError(f"Unmerge the adapters before selecting layers ({name} is merged).")
            if layer_of(name, config.granularity) in keep:
                module.drop_gate(adapter_name)
                if not keep_weights:
                    module.reset_adapter_parameters(adapter_name, config.init_weights)
                continue
            module.remove_adapter(adapter_name)
        self._unwrap_empty_layers()
        del self.ila_gates[adapter_name]
        for field_name, value in selected.config_fields().items():
            setattr(config, field_name, value)
        if config.bias == "ila_only" and not config.inference_mode:  # unwrapped layers' biases stop training
            self._mark_only_adapters_as_trainable(self.model)
        self.set_adapter(self.active_adapter, inference_mode=config.inference_mode)

    def select_as_saved(self, directory: str | os.PathLike, adapter_name: str | None = None) -> bool:
        """Give a probe adapter the selection saved in an adapter directory, keeping its weights, so that the saved
        weights then load into it: what resuming a Trainer from a checkpoint taken after [`ILACallback`] selected
        needs before `trainer.train(resume_from_checkpoint=directory)`. Returns False (and changes nothing) when the
        directory holds a probe adapter too. Loading the weights checks them against the mask."""
        adapter_name = adapter_name or self._the_active_adapter()
        saved = ILAConfig.from_pretrained(str(directory))
        if saved.selected_layers is None:
            return False
        selection = _selection_of(saved, self.ila_candidates[adapter_name])
        self.select_layers(selection, adapter_name=adapter_name, keep_weights=True)
        return True

    def _unwrap_empty_layers(self) -> None:
        """Put back the original base module wherever an ILA layer holds no adapter any more."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ILALayer) and not module._all_available_adapter_names():
                parent, _, child_name = _get_submodules(self.model, name)
                setattr(parent, child_name, module.get_base_layer())
        self.targeted_module_names = [n for n, m in self.model.named_modules() if isinstance(m, ILALayer)]

    @contextmanager
    def gate_stage(self, adapter_name: str | None = None) -> Iterator[GateBank]:
        """ILA's second stage on a probe model: the gates are read, every parameter that trains is frozen and the
        gate logits train instead; all undone on exit. Yields the adapter's gate bank."""
        adapter_name = adapter_name or self._the_active_adapter()
        bank = self.ila_gates[adapter_name]
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        bank.logits.requires_grad_(True)
        bank.active = True
        try:
            yield bank
        finally:
            bank.active = False
            bank.logits.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.ila_candidates.pop(adapter_name, None)
        if adapter_name in self.ila_gates:
            del self.ila_gates[adapter_name]
        self._unwrap_empty_layers()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add adapter `adapter_name`, the weighted combination of ILA `adapters`, as LoRA's `add_weighted_adapter`
        (same arguments and combination types; see `weighted.py`). It carries adapters on the union of their
        selections (a probe adapter counts as every candidate), unscored, and is not made active."""
        combination_type = "linear" if len(adapters) == 1 else combination_type  # as LoRA: one adapter, scaled
        config = self._weighted_config(adapters, weights, adapter_name, combination_type, svd_rank)
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        for module in self.model.modules():
            if isinstance(module, ILALayer) and adapter_name in module.ila_A:
                combine_into(
                    module,
                    adapter_name,
                    adapters,
                    weights,
                    combination_type,
                    density=density,
                    majority_sign_method=majority_sign_method,
                    svd_clamp=svd_clamp,
                    svd_full_matrices=svd_full_matrices,
                    svd_driver=svd_driver,
                )

    def _weighted_config(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str, svd_rank: int | None
    ) -> ILAConfig:
        """The config of a weighted combination of `adapters`, or `ValueError` naming what does not fit."""
        if adapter_name in self.peft_config:
            raise ValueError(f"ILA: an adapter named '{adapter_name}' exists already; choose another adapter_name.")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown or not adapters or len(weights) != len(adapters):
            raise ValueError(
                f"ILA: add_weighted_adapter needs existing adapters ({', '.join(self.peft_config)}) and one weight "
                f"each; got adapters {adapters} (unknown: {unknown}) and {len(weights)} weights."
            )
        candidates = self.ila_candidates[adapters[0]]
        if any(self.ila_candidates[a] != candidates for a in adapters):
            raise ValueError(
                "ILA: add_weighted_adapter combines adapters over the same candidate layers; these come from other "
                "target_modules or granularity."
            )
        shared = [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        if any(sum(a in getattr(m, "modules_to_save", {}) for a in adapters) > 1 for m in shared):
            raise ValueError("ILA: cannot combine adapters that each train the same module in modules_to_save.")
        rank = combined_rank(combination_type, [self.peft_config[a].r for a in adapters], svd_rank)
        union = {layer for a in adapters for layer in self.selection(a).selected}
        return replace(
            self.peft_config[adapters[0]],
            r=rank,
            lora_alpha=rank,
            init_weights=True,  # overwritten by the combination; drawn as LoRA draws its combined adapter
            selected_layers=[layer for layer in candidates if layer in union],
            layer_scores=None,
            layer_confidence=None,
            provenance=None,
        )

    def _the_active_adapter(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(f"Several adapters are active ({self.active_adapters}); pass `adapter_name`.")
        return self.active_adapters[0]

    # --- backward stops at the lowest adapted block (see backward.py) -------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Entered by `PeftModel` around every forward (and generate) while an adapter is enabled: routes input
        gradients to the lowest adapted block, and for PEFT's mixed-adapter batches (`adapter_names`, one name per
        row) hands the names to every ILA layer and modules_to_save wrapper for the call."""
        adapter_names = kwargs.get("adapter_names")
        if self.training and torch.is_grad_enabled():
            self._input_grads.route(self.model, self._holds_active_adapter)
        handles = [] if adapter_names is None else self._hand_out_adapter_names(adapter_names, kwargs.get("num_beams"))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hand_out_adapter_names(self, adapter_names: list[str], num_beams: int | None) -> list[Any]:
        """Check a mixed-adapter batch's names and register the pre-forward hooks that pass them on (each name
        repeated `num_beams` times under beam search, except in an encoder, which sees each row once)."""
        if self.training:
            raise ValueError("ILA: cannot pass `adapter_names` in training mode; call model.eval() first.")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"ILA: `adapter_names` must be a list of adapter names, got {type(adapter_names)}.")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"ILA: `adapter_names` names adapters this model does not have: {', '.join(unknown)} (it has "
                f"{', '.join(self.peft_config)}; '{BASE_ADAPTER}' means none)."
            )
        targets = [(self.model.modules(), list(adapter_names))]
        if isinstance(num_beams, int) and num_beams > 1:  # the encoder's hooks, registered after, keep one per row
            targets = [
                (self.model.modules(), [n for n in adapter_names for _ in range(num_beams)]),
                (_modules_of(get_encoder(self.model)), list(adapter_names)),
            ]
        handles = []
        for modules, names in targets:
            hook = partial(adapter_names_pre_forward_hook, adapter_names=names)
            for module in modules:
                if isinstance(module, (ILALayer, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    @staticmethod
    def _holds_active_adapter(block: nn.Module) -> bool:
        """Whether `block` holds an active adapter that trains (a frozen one needs no gradient from below)."""
        return any(
            p.requires_grad
            for m in block.modules()
            if isinstance(m, ILALayer)
            for name in set(m.active_adapters) & set(m.ila_A)
            for p in (*m.ila_A[name].parameters(), *m.ila_B[name].parameters())
        )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        self._input_grads.remove()  # the base model goes back without ILA's hook
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # --- saving and loading the mask with the weights -----------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: ILAConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        to_return.update(_selection_of(config, _candidates_of(model, config, adapter_name)).to_tensors())
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key if key in SAVED_KEYS else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: ILAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        def fail(problem: str) -> ILALoadError:
            return ILALoadError(f"Cannot load ILA adapter '{adapter_name}': {problem}")

        try:
            saved = Selection.from_tensors(state_dict)
        except ValueError as exc:
            raise fail(str(exc)) from None
        candidates = _candidates_of(model, config, adapter_name)
        if list(saved.candidates) != candidates:
            raise fail(
                f"the saved mask covers {len(saved.candidates)} candidate layers ({_few(saved.candidates, 3)}) but "
                f"this model has {len(candidates)} ({_few(candidates, 3)}): another base model or target_modules."
            )
        if config.selected_layers is None and len(saved.selected) < len(candidates):
            raise fail(
                f"the file selects {len(saved.selected)} of its {len(candidates)} layers but the adapter is in the "
                "probe state (every layer). Give it the saved selection first with "
                f"`model.base_model.select_as_saved(<that directory>, '{adapter_name}')`, as a Trainer resumed from a "
                "checkpoint taken after ILACallback selected needs; or load it with PeftModel.from_pretrained."
            )
        differences = _selection_of(config, candidates).differences(saved)
        if differences:
            raise fail(
                f"adapter_config.json and the mask in the weights file disagree on the {' and the '.join(differences)}"
                "; the two files come from different runs."
            )
        # files of peft-ila before the gate logits became unsaved state held them under this key; nothing reads them
        weights = {k: v for k, v in state_dict.items() if k not in SAVED_KEYS and k != "base_model.ila_gates.logits"}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, weights)
        own = {k: v for k, v in model.state_dict().items() if f".{PREFIX}" in k and f".{adapter_name}." in k}
        unexpected = sorted(k for k in remapped if f".{PREFIX}" in k and k not in own)
        missing = sorted(k for k in own if k not in remapped)
        if unexpected or missing:
            raise fail(
                f"the weights file has adapter weights the selection does not explain ({_few(unexpected, 3)}) or "
                f"lacks some it needs ({_few(missing, 3)})."
            )
        for key, value in remapped.items():
            if key in own and own[key].shape != value.shape:
                raise fail(
                    f"{key} has shape {tuple(value.shape)} in the file but {tuple(own[key].shape)} in the model: the "
                    "adapter was trained on a base model of another width or with another r."
                )
        return remapped


def find_candidates(model: nn.Module, config: ILAConfig) -> list[str]:
    """The ordered candidate layers that `config` (its `target_modules`, `exclude_modules`, `granularity`) gives on
    `model`, without changing either: what gates, masks and selections refer to. Raises `ValueError` if no module
    matches or a matched one cannot carry an adapter."""
    config = copy.copy(config)
    if config.target_modules is None:
        config.target_modules = INCLUDE_LINEAR_LAYERS_SHORTHAND
    config = _maybe_include_all_linear_layers(config, model)
    tuner_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    modules, unsupported = [], []
    for name, module in model.named_modules():
        if not name or name.startswith(tuner_prefixes) or not check_target_module_exists(config, name):
            continue
        if isinstance(module, (nn.Linear, Conv1D, ILALayer)):
            modules.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise FieldError(
            "target_modules",
            f"matches modules ILA cannot adapt: {_few(unsupported)}. Only nn.Linear and Conv1D layers can carry ILA "
            "adapters; narrow it (or use 'all-linear').",
        )
    if not modules:
        existing = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        raise FieldError(
            "target_modules",
            f"matches no module of the model. Linear modules that exist: {_few(existing)}.",
            config.target_modules,
        )
    return list(dict.fromkeys(layer_of(name, config.granularity) for name in modules))


def _selection_of(config: ILAConfig, candidates: Sequence[str]) -> Selection:
    """The selection a config states over `candidates` (every one in the probe state)."""
    if config.selected_layers is None:
        return Selection.everything(candidates)
    fields = (config.layer_scores or {}, (), config.provenance or {}, config.layer_confidence or {})
    return Selection(tuple(candidates), tuple(config.selected_layers), *fields)


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Turn off bitsandbytes' repacking of 4-bit weights for CPU inference. On a CPU with AVX512-BF16 its first forward
    in eval mode without gradients repacks the weights for a kernel that passes no gradient to its input, so after one
    evaluation every adapter below a 4-bit layer would train on no gradient (and layers narrower than a quantization
    block fail outright)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _find_tuner(model: nn.Module) -> ILAModel | None:
    """The `ILAModel` of a PeftModel (or the tuner itself), None for a model that only holds ILA layers."""
    return next((m for m in (model, getattr(model, "base_model", None)) if isinstance(m, ILAModel)), None)


def _ila_tuner(model: nn.Module) -> ILAModel:
    tuner = _find_tuner(model)
    if tuner is None:
        raise TypeError(
            "ILA's identification and selection need the PeftModel that get_peft_model(model, ILAConfig(...)) "
            "builds; inject_adapter_in_model and transformers' add_adapter/load_adapter leave only the adapter layers."
        )
    return tuner


def _modules_of(module: nn.Module | None) -> Iterator[nn.Module]:
    return iter(()) if module is None else module.modules()


def _candidates_of(model: nn.Module, config: ILAConfig, adapter_name: str) -> list[str]:
    """The adapter's candidate layers: the tuner's record under a PeftModel; recomputed from the model when
    `inject_adapter_in_model` (transformers' add_adapter / load_adapter) left only the adapter layers."""
    tuner = _find_tuner(model)
    return tuner.ila_candidates[adapter_name] if tuner is not None else find_candidates(model, config)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
