"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): DTensors, each rank holding a shard.

ILA reads whole adapter matrices and gates (norms, scores) and initialises adapters from its seed; these helpers
make both give on a sharded model exactly what they give on the unsharded one. Gathering is a collective: every rank
must call it, in the same order (ILA's loop does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (sharded by FSDP2, or by tensor parallelism)."""
    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: a DTensor gathered from every rank, any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def init_(param: torch.Tensor, fill: Callable[[torch.Tensor], object]) -> None:
    """`fill(param)` in place (e.g. `nn.init.zeros_`), drawn on the whole tensor when `param` is sharded, each rank
    then keeping its shard: the same values as on the unsharded model (every rank draws from the same seed)."""
    if not isinstance(param, DTensor):
        fill(param)
        return
    whole = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
    fill(whole)
    param.copy_(distribute_tensor(whole, param.device_mesh, param.placements))


def reread_trainable(model: nn.Module) -> None:
    """Have FSDP2 read again which parameters of `model` train, after ILA changed it (stage 2's gates, the selection).

    FSDP2 reads it once, before its first forward: under a `MixedPrecisionPolicy` (accelerate's, with bf16) the
    original dtype of the parameters that train then decides what their reduced gradients are cast back to, so a
    float32 parameter that starts training later would be handed a bf16 gradient (a RuntimeError inside torch). torch
    has no public call for this; it is FSDP2's own initialisation of its mixed-precision dtypes, per parameter group.
    A no-op on a model without FSDP2 modules.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._init_mp_dtypes()
