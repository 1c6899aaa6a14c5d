"""ILA rank re-allocation: LoRA on every candidate layer, each layer's rank from its importance, within the trainable
parameters of LoRA at one rank everywhere; a layer's rank is at most `rho` times that rank, as EVA's `rho` caps it
(peft's `EvaConfig`). The result is a plain peft `LoraConfig` (`rank_pattern`, `alpha_pattern`), so the adapter
saves, loads and merges as any LoRA adapter does."""

from __future__ import annotations

import math
import re

from peft import LoraConfig
from torch import nn

from .selection import Selection


def _check(scores: dict[str, float], costs: dict[str, int], r: int, rho: float) -> None:
    if not costs:
        raise ValueError("allocate_ranks needs at least one layer: `costs` is empty.")
    if set(scores) != set(costs):
        odd = sorted(set(scores) ^ set(costs))[:3]
        raise ValueError(f"allocate_ranks: `scores` and `costs` must name the same layers; they differ on {odd}.")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"allocate_ranks: `r` is {r!r}; give the uniform rank, an int >= 1.")
    if not rho >= 1:
        raise ValueError(f"allocate_ranks: `rho` is {rho!r}; a cap below 1x the rank cannot fill the budget: use >= 1.")
    bad = [name for name, score in scores.items() if not score >= 0]  # negative or NaN
    if bad:
        raise ValueError(f"allocate_ranks: scores must be numbers >= 0; {bad[:3]} are not.")


def allocate_ranks(scores: dict[str, float], costs: dict[str, int], r: int, rho: float = 2.0) -> dict[str, int]:
    """Each layer's rank, proportional to its importance `scores[name]`, so that the parameters they train,
    sum(rank x `costs[name]`) (cost: parameters per unit of rank, in + out features of a linear layer), fill the
    budget of rank `r` everywhere, r x sum(costs): every layer at least 1 and at most floor(`rho` x r). No layer could
    take one rank more without passing the budget or its cap. All scores 0: rank r everywhere."""
    _check(scores, costs, r, rho)
    if not any(scores.values()):
        return dict.fromkeys(costs, r)
    cap, budget = math.floor(rho * r), r * sum(costs.values())

    def ideal(scale: float) -> dict[str, float]:
        return {name: min(cap, max(1.0, scale * scores[name])) for name in costs}

    low, high = 0.0, cap / min(s for s in scores.values() if s > 0)  # at `high` every scored layer is capped
    for _ in range(100):  # the scale at which the continuous ranks fill the budget
        middle = (low + high) / 2
        used = sum(rank * costs[name] for name, rank in ideal(middle).items())
        low, high = (middle, high) if used < budget else (low, middle)
    target = ideal(low)
    ranks = {name: math.floor(rank) for name, rank in target.items()}
    left = budget - sum(ranks[name] * costs[name] for name in costs)
    while fits := [name for name in costs if ranks[name] < cap and costs[name] <= left]:
        name = max(fits, key=lambda n: target[n] - ranks[n])  # the largest shortfall first
        ranks[name] += 1
        left -= costs[name]
    return ranks


def rank_parameter_count(ranks: dict[str, int], costs: dict[str, int]) -> int:
    """The parameters LoRA trains at these ranks: sum(rank x cost)."""
    return sum(rank * costs[name] for name, rank in ranks.items())


def linear_costs(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Parameters per unit of LoRA rank of each named linear layer: in + out features."""
    costs = {}
    for name in names:
        module = model.get_submodule(name)
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer: ranks are allocated to those.")
        costs[name] = module.in_features + module.out_features
    return costs


def importance_lora_config(
    model: nn.Module, selection: Selection, r: int, lora_alpha: float, rho: float = 2.0, **lora_kwargs
) -> LoraConfig:
    """A peft `LoraConfig` on every candidate of `selection` (names in `model`), each at the rank its score gives
    (`allocate_ranks`; an unscored candidate counts as 0, rank 1), within the parameters of rank `r` everywhere;
    `alpha_pattern` keeps alpha / rank at `lora_alpha` / `r` on every layer (as EVA's `adjust_scaling_factors`).
    The pattern's keys are the layers' escaped full names, so `layers.1.` never matches `layers.11.`."""
    names = list(selection.candidates)
    costs = linear_costs(model, names)
    ranks = allocate_ranks({name: float(selection.scores.get(name, 0.0)) for name in names}, costs, r, rho)
    pattern = {re.escape(name): rank for name, rank in ranks.items()}
    alphas = {re.escape(name): lora_alpha * rank / r for name, rank in ranks.items()}
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=names,
        rank_pattern=pattern,
        alpha_pattern=alphas,
        **lora_kwargs,
    )
