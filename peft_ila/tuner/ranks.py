"""ILA rank re-allocation: LoRA on every candidate layer, each layer's rank from its importance, within the trainable
parameters of LoRA at one rank everywhere; a layer's rank is at most `rho` times that rank, as EVA's `rho` caps it
(peft's `EvaConfig`). The result is a plain peft `LoraConfig` (`rank_pattern`, `alpha_pattern`), so the adapter
saves, loads and merges as any LoRA adapter does."""

from __future__ import annotations

import math
import re

from peft import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from .selection import Selection, _few

# LoraConfig fields importance_lora_config sets itself: which modules are adapted, and at which ranks
_SET_HERE = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
)


def _check(scores: dict[str, float], costs: dict[str, int], r: int, rho: float) -> None:
    """`ValueError` naming the argument of `allocate_ranks` that cannot be used, and what to give instead."""
    if not costs and not scores:
        raise ValueError("allocate_ranks: `scores` and `costs` are empty; give at least one layer.")
    if set(scores) != set(costs):
        lacking, extra = [n for n in costs if n not in scores], [n for n in scores if n not in costs]
        raise ValueError(
            f"allocate_ranks: `scores` and `costs` must name the same layers; `scores` lacks [{_few(lacking)}] and "
            f"`costs` lacks [{_few(extra)}]: give both for every layer."
        )
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"allocate_ranks: `r`={r!r}; give the rank of LoRA on every layer, an int >= 1.")
    if not (math.isfinite(rho) and rho >= 1):
        raise ValueError(
            f"allocate_ranks: `rho`={rho!r}; the cap floor(rho x r) must allow rank r: use 1 <= rho < inf."
        )
    bad = [f"{n}={s!r}" for n, s in scores.items() if not (math.isfinite(s) and s >= 0)]  # negative, NaN, inf
    if bad:
        raise ValueError(f"allocate_ranks: `scores` must be finite numbers >= 0; {_few(bad)} are not: clip them.")
    bad = [f"{n}={c!r}" for n, c in costs.items() if not isinstance(c, int) or isinstance(c, bool) or c < 1]
    if bad:
        raise ValueError(f"allocate_ranks: `costs` must be ints >= 1 (in + out features); {_few(bad)} are not.")


def _fill(scores: dict[str, float], costs: dict[str, int], cap: int, budget: int) -> dict[str, float]:
    """Continuous ranks scale x score, each clipped to [1, cap], with the largest scale whose ranks stay within
    `budget` parameters (water-filling: clipped layers fixed, the rest share what is left in proportion)."""

    def ranks(scale: float) -> dict[str, float]:
        return {name: min(cap, max(1.0, scale * scores[name])) for name in costs}

    low, high = 0.0, cap / min(s for s in scores.values() if s > 0)  # at `high` every scored layer is capped
    for _ in range(100):
        middle = (low + high) / 2
        used = sum(rank * costs[name] for name, rank in ranks(middle).items())
        low, high = (middle, high) if used <= budget else (low, middle)
    return ranks(low)


def allocate_ranks(scores: dict[str, float], costs: dict[str, int], r: int, rho: float = 2.0) -> dict[str, int]:
    """Each layer's LoRA rank, proportional to its importance `scores[name]` (>= 0), within the parameters of rank
    `r` on every layer: sum(rank x costs[name]) <= r x sum(costs), where a cost is the parameters per unit of rank
    (in + out features of a linear layer). Every rank is in [1, floor(`rho` x r)]; ranks are whole, the leftover
    handed out one at a time by largest remainder, so no layer could take one more within the budget and its cap.
    Equal scores and costs, or all scores 0: rank r everywhere. `ValueError` naming a bad argument."""
    _check(scores, costs, r, rho)
    if not any(scores.values()):
        return dict.fromkeys(costs, r)
    cap, budget = math.floor(rho * r), r * sum(costs.values())
    target = _fill(scores, costs, cap, budget)
    ranks = {name: math.floor(rank) for name, rank in target.items()}
    left = budget - rank_parameter_count(ranks, costs)
    while fits := [name for name in costs if ranks[name] < cap and costs[name] <= left]:
        name = max(fits, key=lambda n: target[n] - ranks[n])  # the largest remainder first
        ranks[name] += 1
        left -= costs[name]
    return ranks


def rank_parameter_count(ranks: dict[str, int], costs: dict[str, int]) -> int:
    """The parameters LoRA trains at these ranks: sum(rank x cost)."""
    return sum(rank * costs[name] for name, rank in ranks.items())


def linear_costs(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Parameters per unit of LoRA rank of each named layer of `model`: in + out features of an nn.Linear (or a
    layer that has both, e.g. a quantized one) or a transformers Conv1D. `ValueError` for any other module."""
    costs = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, Conv1D):
            costs[name] = module.nx + module.nf
        elif isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        ):
            costs[name] = module.in_features + module.out_features
        else:
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a linear layer: ranks are allocated to nn.Linear and Conv1D "
                "layers only (for a selection of blocks, identify with granularity 'module')."
            )
    return costs


def importance_lora_config(
    model: nn.Module, selection: Selection, r: int, lora_alpha: float, rho: float = 2.0, **lora_kwargs
) -> LoraConfig:
    """A peft `LoraConfig` adapting exactly the candidates of `selection` (full module names in `model`), each at
    the rank `allocate_ranks` gives its score (an unscored candidate counts as 0), within the trainable parameters
    of rank `r` everywhere, at most floor(`rho` x r). `alpha_pattern` keeps each layer's scaling at that of rank `r`
    and `lora_alpha` (alpha / rank, or alpha / sqrt(rank) with `use_rslora`), as EVA's `adjust_scaling_factors`.
    `lora_kwargs` go to `LoraConfig` (e.g. task_type, lora_dropout), except the fields set here."""
    given = [key for key in _SET_HERE if key in lora_kwargs]
    if given:
        raise ValueError(f"importance_lora_config sets {given} itself (from `selection`); leave them out.")
    names = list(selection.candidates)
    costs = linear_costs(model, names)
    if all(isinstance(model.get_submodule(name), Conv1D) for name in names):
        lora_kwargs.setdefault("fan_in_fan_out", True)  # Conv1D stores its weight as (in, out)
    ranks = allocate_ranks({name: float(selection.scores.get(name, 0.0)) for name in names}, costs, r, rho)
    scaled = (lambda rank: math.sqrt(rank / r)) if lora_kwargs.get("use_rslora") else (lambda rank: rank / r)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules="|".join(map(re.escape, names)),  # peft matches a string in full: these modules, no other
        rank_pattern={_whole_name(name): rank for name, rank in ranks.items()},
        alpha_pattern={_whole_name(name): lora_alpha * scaled(rank) for name, rank in ranks.items()},
        **lora_kwargs,
    )


def _whole_name(name: str) -> str:
    """A `rank_pattern` key matching module `name` only: peft matches a key against the end of a module's name after
    a dot, so `^` keeps `x.{name}` out, and the escaped dots `layers.1.` out of `layers.11.`."""
    return "^" + re.escape(name)
