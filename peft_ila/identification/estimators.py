"""Importance estimators: how the candidate layers are scored once stage 1 has trained an adapter on each of them.

An estimator owns ILA's second stage. It declares its budget (`steps`: optimizer steps over the data, 0 for none), the
optimizer that holds its state (checkpointed, resumed and averaged over ranks by the recipe and the training loop
like any other), an optional penalty, and turns the gate bank, the optimizer state and the update norms into scores
in [0, 1] (higher: more important). Add one by subclassing `Estimator` and naming it in `ESTIMATORS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from ..tuner.config import ILAConfig
from ..tuner.layer import GateBank


class Estimator:
    """Base class: `stage2_steps` steps from gates at `gate_init`, no optimizer, no penalty; subclasses say what
    differs and how they score."""

    name: ClassVar[str]
    desc: ClassVar[str]  # progress-bar label of its stage

    def __init__(self, config: ILAConfig) -> None:
        self.config = config

    def steps(self) -> int:
        """Optimizer steps of its stage (0: it needs none)."""
        return self.config.stage2_steps

    def optimizer(self, bank: GateBank) -> torch.optim.Optimizer | None:
        """The optimizer of the gate logits during its stage; its state is the estimator's state."""
        return None

    def start(self, bank: GateBank) -> None:
        """Set the gate logits where its stage begins, every gate at `gate_init` (not called when a resumed stage is
        under way)."""
        with torch.no_grad():
            bank.logits.fill_(math.log(self.config.gate_init / (1 - self.config.gate_init)))

    def penalty(self, bank: GateBank) -> Callable[[], torch.Tensor] | None:
        return None

    def scores(self, bank: GateBank, optimizer: torch.optim.Optimizer | None, norms: list[float]) -> list[float]:
        """One score in [0, 1] per candidate layer, in candidate order. `norms`: ||dW|| after stage 1."""
        raise NotImplementedError


class Gates(Estimator):
    """The paper's stage 2: learn g_i = sigmoid(s_i) from `gate_init` with Adam (`gate_lr`), minimising the task
    loss of W_i + g_i dW_i plus `sparsity_weight * mean(g)`; the score is the gate."""

    name = "gates"
    desc = "ILA stage 2: gates"

    def optimizer(self, bank: GateBank) -> torch.optim.Optimizer:
        return torch.optim.Adam([bank.logits], lr=self.config.gate_lr)

    def penalty(self, bank: GateBank) -> Callable[[], torch.Tensor]:
        return lambda: self.config.sparsity_weight * bank.gates().mean()

    def scores(self, bank: GateBank, optimizer: torch.optim.Optimizer | None, norms: list[float]) -> list[float]:
        return bank.gates().detach().float().cpu().tolist()


class UpdateNorm(Estimator):
    """||dW_i|| = ||B A|| * lora_alpha / r after stage 1, divided by the largest: no stage of its own."""

    name = "update-norm"
    desc = "ILA: update norms"

    def steps(self) -> int:
        return 0

    def scores(self, bank: GateBank, optimizer: torch.optim.Optimizer | None, norms: list[float]) -> list[float]:
        top = max(norms)
        return [n / top if top > 0 else 0.0 for n in norms]


class FirstOrder(Estimator):
    """A first-order estimate of how much each layer's stage-1 update lowers the loss: the mean over `stage2_steps`
    steps of -dL/dg_i with every gate at `gate_init` (at the default 0.5, the midpoint rule for L(g=0) - L(g=1)),
    scaled to [0, 1] over the candidates. Nothing is trained: the gradients are summed in a `GradientSum` state.
    (At g = 1, where stage 1 left the model, a converged stage 1 makes every such gradient vanish.)"""

    name = "first-order"
    desc = "ILA: first-order scores"

    def optimizer(self, bank: GateBank) -> torch.optim.Optimizer:
        return GradientSum([bank.logits])

    def scores(self, bank: GateBank, optimizer: torch.optim.Optimizer | None, norms: list[float]) -> list[float]:
        state = optimizer.state[bank.logits]
        slope = self.config.gate_init * (1 - self.config.gate_init)  # dg/ds of the sigmoid there
        gain = (-state["sum"] / state["steps"] / slope).double()  # -dL/dg per layer
        low, high = gain.min(), gain.max()
        return ((gain - low) / (high - low) if high > low else torch.zeros_like(gain)).tolist()


class GradientSum(torch.optim.Optimizer):
    """An optimizer that moves nothing: each step adds the gradients to `state[p]["sum"]` and counts the steps, so a
    sum over batches is checkpointed and resumed like optimizer state (and is rank-averaged by the training loop)."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"], state["steps"] = torch.zeros_like(p), torch.zeros((), dtype=torch.long)
                state["sum"].add_(p.grad)
                state["steps"] += 1


ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (Gates, UpdateNorm, FirstOrder)}
