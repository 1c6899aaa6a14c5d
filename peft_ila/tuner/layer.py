"""ILA adapter layers: a LoRA update B @ A * lora_alpha / r, scaled in the probe state by a learned layer gate."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from ._peft_compat import BASE_ADAPTER, NAN_MERGE_MESSAGE
from .config import ILAConfig
from .sharding import full, init_


class GateBank(nn.Module):
    """One logit s_i per candidate layer; gate g_i = sigmoid(s_i) in [0, 1].

    While `active` is False (stage 1, or a bank never trained) every gate reads as exactly 1. The logits are the
    estimator's transient state, not adapter weights: a float32 buffer that is neither saved nor a parameter, so
    PEFT's rules for adapter parameters (dtype autocast, requires_grad, saving) apply to the adapters alone. Only
    [`ILAModel.gate_stage`] makes them require a gradient, for the estimator's optimizer.
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(n_layers), persistent=False)
        self.active = False

    def gate(self, index: int) -> torch.Tensor | None:
        """Gate of layer `index` (a 0-dim tensor), or None for 'exactly 1'."""
        return torch.sigmoid(self.logits[index]) if self.active else None

    def gates(self) -> torch.Tensor:
        """All gates, float [n_layers]."""
        return torch.sigmoid(self.logits)


class ILALayer(BaseTunerLayer):
    """Adapter mixin: per adapter a rank-r pair (ila_A: in -> r, ila_B: r -> out) and, in the probe state, a gate."""

    adapter_layer_names = ("ila_A", "ila_B")
    other_param_names = ("r", "lora_alpha", "scaling", "ila_dropout", "gate_index")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        # peft's reader and writer of a quantized base weight (bitsandbytes 4/8-bit, ...); None for a float one
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ila_dropout = nn.ModuleDict({})
        self.ila_A = nn.ModuleDict({})
        self.ila_B = nn.ModuleDict({})
        self.gate_index: dict[str, int] = {}
        self._gate_banks: dict[str, GateBank] = {}  # plain dict: the ILAModel owns the bank
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"ILA cannot adapt {type(self.get_base_layer()).__name__}: only nn.Linear and Conv1D.")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        config: ILAConfig,
        gate_bank: GateBank | None = None,
        gate_index: int | None = None,
    ) -> None:
        """Add adapter `adapter_name`; with a gate bank the adapter is gated (probe state)."""
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.ila_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.ila_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False)
        self.ila_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False)
        if gate_bank is not None:
            self.gate_index[adapter_name] = gate_index
            self._gate_banks[adapter_name] = gate_bank
        self.reset_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """A Kaiming-uniform; B zero (the update starts at 0) or, with init_weights=False, random too (drawn whole
        when sharded: the same values as unsharded)."""
        init_(self.ila_A[adapter_name].weight, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        if init_weights:
            init_(self.ila_B[adapter_name].weight, nn.init.zeros_)
        else:
            init_(self.ila_B[adapter_name].weight, lambda w: nn.init.normal_(w, std=0.1))

    def gate(self, adapter_name: str) -> torch.Tensor | None:
        """The adapter's gate (0-dim tensor) in the probe state while gates are learned, else None (= 1)."""
        bank = self._gate_banks.get(adapter_name)
        return None if bank is None else bank.gate(self.gate_index[adapter_name])

    def drop_gate(self, adapter_name: str) -> None:
        """Leave the probe state: the adapter becomes a plain LoRA update."""
        self._gate_banks.pop(adapter_name, None)
        self.gate_index.pop(adapter_name, None)

    def remove_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's weights without changing which adapters are active (the model decides that)."""
        for attr in self.adapter_layer_names + self.other_param_names:
            if adapter_name in getattr(self, attr):
                del getattr(self, attr)[adapter_name]
        self._gate_banks.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._gate_banks.pop(adapter_name, None)

    def update_norm(self, adapter_name: str) -> float:
        """Frobenius norm of the adapter's update ||B @ A|| * scaling."""
        with torch.no_grad():
            delta = full(self.ila_B[adapter_name].weight).float() @ full(self.ila_A[adapter_name].weight).float()
            return float(delta.norm()) * self.scaling[adapter_name]


class Linear(nn.Module, ILALayer):
    """ILA on an nn.Linear, or on transformers' Conv1D (weight stored as [in, out]: fan_in_fan_out=True)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: ILAConfig,
        fan_in_fan_out: bool = False,
        gate_bank: GateBank | None = None,
        gate_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ILALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, gate_bank, gate_index)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Weight update of the adapter, shaped like the base weight ([out, in], or [in, out] for Conv1D)."""
        weight_B = self.ila_B[adapter_name].weight
        dtype = weight_B.dtype
        upcast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        weight_A = self.ila_A[adapter_name].weight
        if upcast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter_name]
        gate = self.gate(adapter_name)
        if gate is not None:
            delta = delta * gate.to(delta.dtype)
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' updates into the base weight. A quantized base weight is dequantized,
        updated and quantized again (as peft does for LoRA), which rounds the merged weight."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.ila_A:
                continue
            self._warn_if_rounded("Merging")
            weight = self.get_base_weight()  # a quantized base: a dequantized copy
            if safe_merge and self.quantization_backend is None:
                weight = weight.clone()
            weight += self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(NAN_MERGE_MESSAGE.format(adapter=name))
            if safe_merge or self.quantization_backend is not None:
                self.set_base_weight(weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged updates again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.ila_A:
                self._warn_if_rounded("Unmerging")
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(name).to(weight.dtype)
                if self.quantization_backend is not None:
                    self.set_base_weight(weight)

    def _warn_if_rounded(self, what: str) -> None:
        if self.quantization_backend is not None:
            warnings.warn(
                f"{what} an ILA adapter into a {self.quantization_backend.backend_name} base weight quantizes the "
                "result again, so outputs change by the rounding; for an exact merge, load the base model unquantized "
                "and merge there.",
                stacklevel=3,
            )

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The base layer's output plus every active adapter's update; with `adapter_names` (one name per row of `x`,
        `"__base__"` for none: PEFT's mixed-adapter batches) each row gets its own adapter's update instead."""
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        for name in self.active_adapters:
            if name in self.ila_A:
                result = result + self._update(name, x).to(result.dtype)
        return result

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter `name`'s update of input `x` [..., in] -> [..., out]: B A dropout(x) * scaling (* its gate)."""
        ila_A, ila_B = self.ila_A[name], self.ila_B[name]
        h = ila_B(ila_A(self.ila_dropout[name](self._cast_input_dtype(x, ila_A.weight.dtype))))
        gate = self.gate(name)
        return h * (self.scaling[name] if gate is None else self.scaling[name] * gate)

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(adapter_names) != len(x):
            raise ValueError(
                f"ILA: `adapter_names` names {len(adapter_names)} adapters for a batch of {len(x)} rows; give one "
                f"adapter name (or '{BASE_ADAPTER}') per row."
            )
        if self.merged:
            raise ValueError(
                "ILA: cannot pass `adapter_names` while adapters are merged; call `unmerge_adapter()` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """`result` [batch, ..., out] with each row's own adapter update added (none for `"__base__"`, or for an
        adapter this layer does not carry: that adapter leaves the layer as the base model's)."""
        result = result.clone()
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ADAPTER or name not in self.ila_A:
                continue
            rows = [i for i, row_name in enumerate(adapter_names) if row_name == name]
            result[rows] += self._update(name, x[rows]).to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "ila." + super().__repr__()
