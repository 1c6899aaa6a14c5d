"""Weighted combinations of ILA adapters: PEFT's `add_weighted_adapter`, on ILA's layers.

ILA's update is LoRA's (B @ A * scaling), so the combinations are LoRA's, computed by peft's own task-arithmetic
functions (`peft.utils.merge_utils`): `cat` stacks the scaled factors (exact, rank = the sum of the ranks), the
`*svd` types combine the updates and truncate them to `svd_rank` by SVD, the rest combine A and B separately (same r
required; a rough approximation, as in LoRA). The new adapter has scaling 1 (`lora_alpha` = `r`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

from .layer import ILALayer

FACTORWISE = {
    "linear": lambda t, w, density, sign: task_arithmetic(t, w),
    "ties": lambda t, w, density, sign: ties(t, w, density, sign),
    "dare_linear": lambda t, w, density, sign: dare_linear(t, w, density),
    "dare_ties": lambda t, w, density, sign: dare_ties(t, w, density, sign),
    "magnitude_prune": lambda t, w, density, sign: magnitude_prune(t, w, density),
}
SVD = {f"{name}_svd" if name != "linear" else "svd": combine for name, combine in FACTORWISE.items()}
COMBINATION_TYPES = ("cat", *SVD, *FACTORWISE)


def combined_rank(combination_type: str, ranks: Sequence[int], svd_rank: int | None) -> int:
    """The rank of the combined adapter, or `ValueError` naming what does not fit."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"ILA: combination_type={combination_type!r} is not one of {', '.join(COMBINATION_TYPES)} (LoRA's)."
        )
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD:
        if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"ILA: svd_rank={svd_rank!r} must be an int >= 1 or None (the largest r).")
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(
            f"ILA: combination_type={combination_type!r} needs adapters of one r (got {sorted(set(ranks))}); use "
            "'cat' or 'svd' for adapters of different ranks."
        )
    return ranks[0]


@torch.no_grad()
def combine_into(
    layer: ILALayer,
    target: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> None:
    """Set adapter `target` of `layer` (A [r, in], B [out, r], scaling 1) to the weighted combination of the
    `adapters` it carries; an adapter the layer does not carry contributes nothing here, as in LoRA."""
    present = [(name, w) for name, w in zip(adapters, weights, strict=True) if name in layer.ila_A]
    A, B = layer.ila_A[target].weight, layer.ila_B[target].weight
    if combination_type == "cat":
        new_A = torch.cat([layer.ila_A[n].weight * (w * layer.scaling[n]) for n, w in present])
        new_B = torch.cat([layer.ila_B[n].weight for n, _ in present], dim=1)
        _fill(A, B, new_A, new_B)
    elif combination_type in SVD:
        deltas = [layer.get_delta_weight(n).float() for n, _ in present]
        delta = SVD[combination_type](deltas, torch.tensor([w for _, w in present]), density, majority_sign_method)
        if layer.fan_in_fan_out:
            delta = delta.T  # [out, in]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
        rank = A.shape[0]
        new_B, new_A = U[:, :rank] * S[:rank], Vh[:rank]
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([new_B.flatten(), new_A.flatten()]), svd_clamp)
            new_B, new_A = new_B.clamp(-high, high), new_A.clamp(-high, high)
        _fill(A, B, new_A, new_B)
    else:
        scaled = [w * layer.scaling[n] for n, w in present]
        on_A = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
        on_B = torch.tensor([math.sqrt(abs(s)) for s in scaled])
        combine = FACTORWISE[combination_type]
        A.copy_(combine([layer.ila_A[n].weight for n, _ in present], on_A, density, majority_sign_method))
        B.copy_(combine([layer.ila_B[n].weight for n, _ in present], on_B, density, majority_sign_method))


def _fill(A: torch.Tensor, B: torch.Tensor, new_A: torch.Tensor, new_B: torch.Tensor) -> None:
    """A [r, in] and B [out, r] set to new_A [k, in] and new_B [out, k] (k <= r), the rest of the rank zero."""
    A.zero_()
    B.zero_()
    A[: new_A.shape[0]] = new_A.to(A.dtype)
    B[:, : new_B.shape[1]] = new_B.to(B.dtype)
