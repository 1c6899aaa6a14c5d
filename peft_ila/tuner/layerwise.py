"""Sampled layerwise training: every `interval` optimizer steps a new active set of layer groups is drawn, uniformly
(LISA, arXiv 2403.17919) or by importance (as OwLore and IST draw by outlier ratio or scores), and only the active
set's parameters train until the next draw.

`LayerSampler` holds the algorithm's state. The draw of interval i is a pure function of (seed, i), so every DDP
rank draws the same set, and a run resumed mid-interval needs nothing but its step count to draw what the
uninterrupted run drew. A parameter outside the active set has `requires_grad=False`: backward computes no gradient
for it (and stops below the lowest active group), and an optimizer skips it, so its value does not change, weight
decay included. When a group leaves the active set its optimizer state is dropped: the optimizer then holds state for
the active set only (the memory that makes the method cheap), and a group drawn again starts with fresh moments, as
LISA's implementations do by building a new optimizer at each draw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .config import resolve_top_k
from .selection import layer_of


@dataclass(frozen=True)
class LayerwiseConfig:
    """How the active set is drawn.

    `active`: groups active at a time (an int, or a fraction of the groups as `top_k` takes it); `interval`: optimizer
    steps between draws; `importance_weight` w in [0, 1]: each group's probability is (1 - w) / n + w * q, q being the
    importance raised to 1 / `temperature` and normalised (w = 0: uniform, LISA); `seed`: the draws'."""

    active: int | float = 2
    interval: int = 10
    importance_weight: float = 0.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.active, bool) or not isinstance(self.active, (int, float)) or self.active <= 0:
            raise ValueError(f"LayerwiseConfig.active={self.active!r}: give a count >= 1 or a fraction in (0, 1].")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"LayerwiseConfig.interval={self.interval!r}: give a whole number of steps >= 1.")
        if not 0.0 <= self.importance_weight <= 1.0:
            raise ValueError(
                f"LayerwiseConfig.importance_weight={self.importance_weight!r}: give a value in [0, 1] (0: uniform)."
            )
        if not self.temperature > 0:
            raise ValueError(f"LayerwiseConfig.temperature={self.temperature!r}: give a value > 0.")


def block_groups(model: nn.Module, names: Iterable[str]) -> dict[str, list[nn.Parameter]]:
    """The weights of the modules `names` (e.g. ILA's candidate layers), grouped by transformer block in model order:
    block name -> [weight, ...], for full-weight layerwise training."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name in names:
        groups.setdefault(layer_of(name, "block"), []).append(model.get_submodule(name).weight)
    return groups


def trainable_blocks(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of `model` that requires gradients, grouped by transformer block in model order (a PEFT
    wrapper's prefix left out, so the names match a selection's): the groups of layerwise training of whatever
    trains, full weights or adapters."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(layer_of(name.removeprefix("base_model.model."), "block"), []).append(param)
    return groups


def block_importance(scores: dict[str, float]) -> dict[str, float]:
    """Layer scores (e.g. `ILAResult.scores`) summed per transformer block."""
    out: dict[str, float] = {}
    for name, score in scores.items():
        out[layer_of(name, "block")] = out.get(layer_of(name, "block"), 0.0) + score
    return out


class LayerSampler:
    """The state of sampled layerwise training over `groups` (name -> parameters, e.g. `block_groups`): their draw
    probabilities, the active set, and the interval it was drawn for. Call `at_step(step, optimizer)` before every
    optimizer step's forward pass."""

    def __init__(
        self,
        groups: dict[str, list[nn.Parameter]],
        config: LayerwiseConfig,
        importance: dict[str, float] | None = None,
    ) -> None:
        if not groups:
            raise ValueError("LayerSampler needs at least one group of parameters to draw from.")
        if config.importance_weight > 0 and (importance is None or set(importance) != set(groups)):
            raise ValueError(
                "LayerwiseConfig.importance_weight > 0 needs an importance for every group (e.g. "
                "block_importance(result.scores)); or set importance_weight=0 for uniform draws."
            )
        self.groups, self.config = groups, config
        self.k = resolve_top_k(config.active, len(groups), "active", "LayerwiseConfig")
        self.probabilities = draw_probabilities(list(groups), config, importance)
        self.interval: int | None = None  # the interval the active set was drawn for
        self.active: list[str] = []
        self.most_active = 0  # the most parameters active at once so far

    def draw(self, interval: int) -> list[str]:
        """The groups active during interval `interval` (steps interval * config.interval onwards), in group order:
        `k` distinct groups, each drawn with its probability (Efraimidis-Spirakis keys), from (seed, interval)."""
        rng = random.Random(f"{self.config.seed}/{interval}")
        keys = {name: rng.random() ** (1 / p) if p > 0 else -1.0 for name, p in self.probabilities.items()}
        chosen = set(sorted(keys, key=keys.__getitem__, reverse=True)[: self.k])
        return [name for name in self.groups if name in chosen]

    def at_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Before optimizer step `step` (0-based): at the start of a new interval (or the first call, e.g. after a
        resume), draw its active set, let only its parameters require gradients, and drop `optimizer`'s state of
        the parameters that left. True when the active set was (re)drawn."""
        interval = step // self.config.interval
        if interval == self.interval:
            return False
        active = self.draw(interval)
        leaving = [p for name in self.active if name not in active for p in self.groups[name]]
        for name, params in self.groups.items():
            for param in params:
                param.requires_grad_(name in active)
                param.grad = None
        if optimizer is not None:
            for param in leaving:
                optimizer.state.pop(param, None)
        self.interval, self.active = interval, active
        self.most_active = max(self.most_active, sum(p.numel() for name in active for p in self.groups[name]))
        return True

    def hook(self, optimizer: torch.optim.Optimizer, then: Callable[..., None] | None = None) -> Callable[..., None]:
        """Draw the first active set now and return a `train_steps` `on_step` hook that draws the next one after
        every step (before the next step's forward pass), then calls `then(stats)` if given."""

        def after(stats) -> None:
            self.at_step(stats.steps, optimizer)
            if then is not None:
                then(stats)

        self.at_step(0, optimizer)
        return after

    def train_only_groups(self, model: nn.Module) -> None:
        """Freeze every parameter of `model` outside the groups and let every group's parameters train, so that an
        optimizer built next (e.g. by `transformers.Trainer`) holds them all; `at_step` then narrows the set."""
        mine = {id(p) for p in self.parameters()}
        for param in model.parameters():
            param.requires_grad_(id(param) in mine)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of every group (what the optimizer is built over: those outside the active set have no
        gradient and are skipped)."""
        return [p for params in self.groups.values() for p in params]


def draw_probabilities(
    names: list[str], config: LayerwiseConfig, importance: dict[str, float] | None
) -> dict[str, float]:
    """Each group's probability: (1 - w) / n + w * q, q = importance ** (1 / temperature), normalised."""
    n, w = len(names), config.importance_weight
    if w == 0:
        return dict.fromkeys(names, 1 / n)
    if any(not math.isfinite(importance[x]) or importance[x] < 0 for x in names):
        raise ValueError("Layer importance must be finite and >= 0 for every group.")
    powered = {x: importance[x] ** (1 / config.temperature) for x in names}
    total = sum(powered.values())
    q = {x: v / total for x, v in powered.items()} if total > 0 else dict.fromkeys(names, 1 / n)
    return {x: (1 - w) / n + w * q[x] for x in names}
