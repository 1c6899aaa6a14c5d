"""Layer selectors to compare ILA with: each returns k candidate layer names (granularity "module").

Data-free: first/last blocks; random, KappaTune (condition number) and Spectrum-style signal-to-noise ratio are
the library's (`peft_ila.identification.peers`, which `Recipe` arms select with), re-exported.
Data-driven and cheap: adapter gradient norm over a few steps, the first-order score of a gradient step on each
layer's own weight (no training). (||B A|| after ILA's stage 1, with no stage 2, is the library's own `update-norm`
estimator, not a baseline here.)
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.core.stats import top_k
from peft_ila import ILALayer, resolve_top_k
from peft_ila.identification.peers import kappa_layers, random_layers, spectrum_layers, spectrum_snr
from peft_ila.identification.training import cycle, train_steps
from peft_ila.tuner.selection import layer_of

__all__ = [
    "blocks",
    "edge_blocks",
    "first_order_layers",
    "gradnorm_layers",
    "kappa_layers",
    "random_layers",
    "spectrum_layers",
    "spectrum_snr",
]


def blocks(candidates: list[str]) -> list[str]:
    """The transformer blocks the candidates belong to, in model order."""
    return list(dict.fromkeys(layer_of(name, "block") for name in candidates))


def edge_blocks(candidates: list[str], fraction: float, last: bool) -> list[str]:
    """Every candidate in the first (or last) `fraction` of the blocks, rounded half up (as `top_k` is)."""
    order = blocks(candidates)
    n = resolve_top_k(fraction, len(order))
    chosen = set(order[-n:] if last else order[:n])
    return [name for name in candidates if layer_of(name, "block") in chosen]


def gradnorm_layers(probe: nn.Module, batches, steps: int, k: int, lr: float, accelerator=None) -> list[str]:
    """The k layers with the largest `gradnorm_scores`."""
    return top_k(gradnorm_scores(probe, batches, steps, lr, accelerator), k)


def gradnorm_scores(probe: nn.Module, batches, steps: int, lr: float, accelerator=None) -> dict[str, float]:
    """Train every adapter of an ILA probe model for `steps` steps (the shared training loop) while summing each
    layer's adapter gradient norm: layer -> that sum."""
    tuner = probe.base_model
    adapter = tuner.active_adapters[0]
    sums: dict[str, float] = dict.fromkeys(tuner.candidate_layers(), 0.0)
    hooks = []
    for name, module in tuner.model.named_modules():
        if isinstance(module, ILALayer) and adapter in module.ila_A:
            for param in (module.ila_A[adapter].weight, module.ila_B[adapter].weight):

                def add(p: torch.Tensor, name: str = name) -> None:
                    sums[name] += float(p.grad.norm())

                hooks.append(param.register_post_accumulate_grad_hook(add))
    params = [p for p in probe.parameters() if p.requires_grad]
    try:
        train_steps(
            probe,
            cycle(batches),
            torch.optim.AdamW(params, lr=lr),
            steps,
            accelerator=accelerator,
            desc="gradient-norm proxy",
            progress=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def first_order_layers(model: nn.Module, candidates: list[str], batches, steps: int, k: int) -> list[str]:
    """The k layers with the largest `first_order_scores`."""
    return top_k(first_order_scores(model, candidates, batches, steps), k)


def first_order_scores(model: nn.Module, candidates: list[str], batches, steps: int) -> dict[str, float]:
    """How much one gradient step on each candidate's weight alone lowers the loss, to first order (up to the
    learning rate): ||mean over `steps` batches of dL/dW||^2. Nothing trains; only the candidates' weights get
    gradients, and `requires_grad` is put back afterwards."""
    weights = {name: model.get_submodule(name).weight for name in candidates}
    states = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in states:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.train()
        for batch, _ in zip(cycle(batches), range(steps), strict=False):
            model(**batch).loss.backward()
        return {name: float((w.grad / steps).pow(2).sum()) for name, w in weights.items()}
    finally:
        for p, requires_grad in states:
            p.requires_grad_(requires_grad)
            p.grad = None
        model.train(was_training)
