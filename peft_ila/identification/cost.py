"""Cost-aware selection: the most important layers whose fine-tune fits a step-time or memory budget.

Backward stops at the lowest adapted block (`tuner/backward.py`): the blocks below it run forward only and keep no
activations. So where the lowest selected layer sits, far more than how many layers are selected, decides a
fine-tune's step time and activation memory. `measure_step_cost` measures both on a model whose adapters cover
every candidate (a probe model) with the adapters trainable from block L up only, at a few L, and fits

    cost(L) = fixed + per_block * (number of blocks from L to the top)

for seconds per forward + backward and for the megabytes autograd keeps for backward. `within_budget` then keeps,
among the layers in blocks at or above the lowest L whose predicted cost fits the budget, the best k of the
selection's ranking. Every higher cutoff allows only a subset of those layers, so no k layers within the budget have
a larger total score under this model.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..tuner.config import parse_budget
from ..tuner.layer import ILALayer
from ..tuner.model import _ila_tuner
from ..tuner.selection import Selection, layer_of
from .training import Batch, _to_device


@dataclass(frozen=True)
class StepCost:
    """Measured cost of one training forward + backward against the lowest adapted block.

    Attributes:
        blocks: the blocks that hold adapters, bottom to top (names such as "model.layers.7").
        measured: [lowest block index, seconds (median), activation MB] for each measured cutoff.
        seconds: (fixed, per block) of the least-squares fit, in seconds; per block clamped at >= 0.
        memory_mb: (fixed, per block) of the fit, in MB of tensors saved for backward; per block >= 0.
    """

    blocks: tuple[str, ...]
    measured: tuple[tuple[int, float, float], ...]
    seconds: tuple[float, float]
    memory_mb: tuple[float, float]

    def predicted(self, resource: str, lowest: int) -> float:
        """Seconds ("time") or MB ("memory") of a step whose lowest adapted block is `blocks[lowest]`."""
        fixed, per_block = self.seconds if resource == "time" else self.memory_mb
        return fixed + per_block * (len(self.blocks) - lowest)

    def fraction(self, resource: str, lowest: int) -> float:
        """`predicted` as a share of adapting every block (lowest = 0)."""
        return self.predicted(resource, lowest) / self.predicted(resource, 0)

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> StepCost:
        measured = tuple(tuple(row) for row in record["measured"])
        return cls(tuple(record["blocks"]), measured, tuple(record["seconds"]), tuple(record["memory_mb"]))


def measure_step_cost(
    model: nn.Module, batch: Batch, adapter_name: str | None = None, cutoffs: int = 3, repeats: int = 2
) -> StepCost:
    """Time forward + backward of `batch` and count the activation bytes autograd saves, with the adapters of
    `adapter_name` trainable only from block L up, for `cutoffs` values of L spread from the bottom to the top block
    (after one warm-up pass; the median of `repeats` passes each, taken in rotation so drift spreads evenly). Every
    parameter's `requires_grad` and gradient are put back afterwards. Works with gradient checkpointing."""
    tuner = _ila_tuner(model)
    adapter = adapter_name or tuner._the_active_adapter()
    by_block: dict[str, list[nn.Parameter]] = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, ILALayer) and adapter in module.ila_A:
            params = [*module.ila_A[adapter].parameters(), *module.ila_B[adapter].parameters()]
            by_block.setdefault(layer_of(name, "block"), []).extend(params)
    blocks = tuple(by_block)
    if len(blocks) < 2:
        raise ValueError(
            f"measure_step_cost: the adapters of '{adapter}' sit in {len(blocks)} block(s); a cost that depends on "
            "the lowest adapted block needs adapters in at least two (use a probe model: every candidate adapted)."
        )
    lows = sorted({round(i * (len(blocks) - 1) / max(cutoffs - 1, 1)) for i in range(cutoffs)})
    params = list(model.parameters())
    parameter_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in params]
    batch = _to_device(batch, model)
    was_training = model.training
    model.train()
    seconds: dict[int, list[float]] = {low: [] for low in lows}
    memory: dict[int, float] = {}
    try:
        for p in params:
            p.requires_grad_(False)
        for round_ in range(repeats + 1):
            for low in lows:
                for index, block in enumerate(blocks):
                    for p in by_block[block]:
                        p.requires_grad_(index >= low)
                took, memory[low] = _one_pass(model, batch, params, parameter_storages)
                if round_ > 0:  # the first round warms up
                    seconds[low].append(took)
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    measured = tuple((low, statistics.median(seconds[low]), memory[low]) for low in lows)
    depths = [len(blocks) - low for low in lows]
    return StepCost(
        blocks,
        measured,
        _fit(depths, [row[1] for row in measured]),
        _fit(depths, [row[2] for row in measured]),
    )


def _one_pass(
    model: nn.Module, batch: Batch, params: Sequence[nn.Parameter], parameter_storages: set[int]
) -> tuple[float, float]:
    """Seconds of one forward + backward, and MB of the distinct storages saved for backward that are not in
    `parameter_storages` (the parameters' data pointers)."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    synchronize = torch.cuda.synchronize if any(p.is_cuda for p in params) else lambda: None
    synchronize()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    synchronize()
    took = time.perf_counter() - start
    for p in params:
        p.grad = None
    return took, sum(kept.values()) / 2**20


def _fit(depths: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares (fixed, per block) of values ~ fixed + per_block * depth, both kept >= 0 as costs are: a
    negative slope (noise) makes the cost flat at the mean, a negative intercept refits through the origin."""
    mean_d, mean_v = statistics.mean(depths), statistics.mean(values)
    spread = sum((d - mean_d) ** 2 for d in depths)
    slope = max(sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values, strict=True)) / spread, 0.0)
    if mean_v - slope * mean_d < 0:
        return 0.0, sum(d * v for d, v in zip(depths, values, strict=True)) / sum(d * d for d in depths)
    return mean_v - slope * mean_d, slope


def within_budget(selection: Selection, cost: StepCost, budget: str, k: int) -> Selection:
    """The best `k` layers of `selection.ranking` whose blocks lie at or above the lowest block L that `budget`
    ("time:F" or "memory:F", F a share of adapting every block) allows under `cost`; fewer than k when the blocks
    from L up hold fewer candidates. The ranking puts these first (then the rest in their order) and the provenance
    records the budget, the cutoff and the cost model; the bootstrap confidence is dropped unless the selected set
    is unchanged. `ValueError` when even the top block alone exceeds the budget, naming the smallest that fits."""
    resource, share = parse_budget(budget)
    position = {block: index for index, block in enumerate(cost.blocks)}
    fractions = [cost.fraction(resource, low) for low in range(len(cost.blocks))]
    allowed = [low for low, fraction in enumerate(fractions) if fraction <= share]
    if not allowed:
        cheapest = math.ceil(min(fractions) * 100) / 100
        raise ValueError(
            f"budget={budget!r} cannot be met: adapting only the top block ({cost.blocks[-1]}) is predicted to cost "
            f"{min(fractions):.3f} of adapting every block; use a budget of at least {resource}:{cheapest:.2f}."
        )
    lowest = allowed[0]
    fits = lambda name: position.get(layer_of(name, "block"), len(cost.blocks)) >= lowest  # noqa: E731
    kept = [name for name in selection.ranking if fits(name)][:k]
    if len(kept) < k:
        warnings.warn(
            f"budget={budget!r} allows only the {len(kept)} candidate layers from {cost.blocks[lowest]} up, fewer "
            f"than the {k} asked for; all of them are selected. Raise the budget to select {k}.",
            stacklevel=2,
        )
    chosen = set(kept)
    ranking = (*kept, *(name for name in selection.ranking if name not in chosen))
    note = {"budget": budget, "lowest_block": cost.blocks[lowest], "predicted_fraction": fractions[lowest]}
    provenance = {**selection.provenance, "budget": {**note, "cost": cost.to_json()}}
    confidence = selection.confidence if chosen == set(selection.selected) else {}
    return Selection(selection.candidates, tuple(kept), selection.scores, ranking, provenance, confidence)
