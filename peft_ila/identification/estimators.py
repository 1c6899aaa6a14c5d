"""Importance estimators: how the candidate layers are scored once stage 1 has trained an adapter on each of them.

An estimator owns ILA's second stage. It declares its budget (`steps`: optimizer steps over the data, 0 for none), the
optimizer that holds its state (checkpointed, resumed and averaged over ranks by the recipe and the training loop
like any other), an optional penalty, and turns the gate bank, the optimizer state and the update norms into scores
in [0, 1] (higher: more important). Add one by subclassing `Estimator` and naming it in `ESTIMATORS`.

Estimators with a stage keep every step's gradient of the gate logits (`state["history"]`, [steps, n_candidates]) and
can `replay` scores from such a history: resampling the steps (a bootstrap) then tells how sure each layer's place in
the top k is, without running the stage again (see `membership_confidence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from ..tuner.config import ILAConfig
from ..tuner.layer import GateBank
from ..tuner.sharding import full


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

    def replay(self, history: torch.Tensor) -> torch.Tensor | None:
        """Scores (any monotone form) from per-step gradients `history` [resamples, steps, n], as if the stage had
        seen those gradients; None when the estimator has no stage to replay."""
        return None


class Gates(Estimator):
    """The paper's stage 2: learn g_i = sigmoid(s_i) from `gate_init` with Adam (`gate_lr`), minimising the task
    loss of W_i + g_i dW_i plus `sparsity_weight * mean(g)`; the score is the gate."""

    name = "gates"
    desc = "ILA stage 2: gates"

    def optimizer(self, bank: GateBank) -> torch.optim.Optimizer:
        return RecordingAdam([bank.logits], lr=self.config.gate_lr)

    def penalty(self, bank: GateBank) -> Callable[[], torch.Tensor]:
        return lambda: self.config.sparsity_weight * bank.gates().mean()

    def scores(self, bank: GateBank, optimizer: torch.optim.Optimizer | None, norms: list[float]) -> list[float]:
        return full(bank.gates().detach()).float().cpu().tolist()

    def replay(self, history: torch.Tensor) -> torch.Tensor:
        """Adam (default betas and eps, as `optimizer` builds it) from `gate_init` over the given gradients: the
        final logits. Without the feedback of the gates on later gradients: a first-order picture of the noise."""
        beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, self.config.gate_lr
        start = math.log(self.config.gate_init / (1 - self.config.gate_init))
        logits = torch.full(history[:, 0].shape, start, dtype=torch.float64)
        m, v = torch.zeros_like(logits), torch.zeros_like(logits)
        for t in range(1, history.shape[1] + 1):
            g = history[:, t - 1].double()
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            logits -= lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        return logits


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
        gain = (-full(state["sum"]) / state["steps"] / slope).double()  # -dL/dg per layer
        low, high = gain.min(), gain.max()
        return ((gain - low) / (high - low) if high > low else torch.zeros_like(gain)).tolist()

    def replay(self, history: torch.Tensor) -> torch.Tensor:
        """The mean of -dL/ds over the steps (the score before scaling)."""
        return -history.double().mean(dim=1)


def _record(optimizer: torch.optim.Optimizer) -> None:
    """Append each parameter's gradient to its `state["history"]` ([steps, numel])."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                state, row = optimizer.state[p], full(p.grad.detach()).reshape(1, -1).float().clone()
                state["history"] = torch.cat([state["history"], row]) if "history" in state else row


class RecordingAdam(torch.optim.Adam):
    """Adam that also keeps every step's gradient in `state[p]["history"]` (checkpointed with the rest)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        _record(self)
        return loss


class GradientSum(torch.optim.Optimizer):
    """An optimizer that moves nothing: each step adds the gradients to `state[p]["sum"]`, counts the steps and keeps
    the step's gradient in `state[p]["history"]`, so a sum over batches is checkpointed and resumed like optimizer
    state (and is rank-averaged by the training loop)."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"], state["steps"] = torch.zeros_like(p), torch.zeros((), dtype=torch.long)
                state["sum"].add_(p.grad)
                state["steps"] += 1
        _record(self)


def membership_confidence(
    estimator: Estimator, history: torch.Tensor, selected: torch.Tensor, seed: int, resamples: int = 200
) -> list[float] | None:
    """For each layer, the fraction of bootstrap resamples of the stage's steps (`history` [steps, n]) in which the
    estimator's replayed scores put it on the same side of the top k as `selected` (bool [n], k of them True) does;
    None when the estimator cannot replay. Deterministic for a given `seed`."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(history.shape[0], (resamples, history.shape[0]), generator=generator)
    replayed = estimator.replay(history[picks])
    if replayed is None:
        return None
    k = int(selected.sum())
    top = torch.zeros_like(replayed, dtype=torch.bool).scatter_(1, replayed.topk(k, dim=1).indices, True)
    return (top == selected).double().mean(dim=0).tolist()


ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (Gates, UpdateNorm, FirstOrder)}
