"""The one training loop: identification's two stages and plain fine-tuning all step through `train_steps`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]


@dataclass
class StepStats:
    """What a run of `train_steps` did: steps, tokens seen, wall seconds, loss per step, and why it stopped."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    stop_reason: str = ""  # "max_steps" | "stable" | "data_exhausted"


class StabilityTest:
    """Epsilon-stability: the mean loss of the last `window` steps moved by less than `epsilon` (relative) from
    the mean of the `window` steps before it. Needs at least 2 * window losses."""

    def __init__(self, epsilon: float, window: int) -> None:
        self.epsilon, self.window = epsilon, window
        self.losses: list[float] = []

    def update(self, loss: float) -> bool:
        self.losses.append(loss)
        if len(self.losses) < 2 * self.window:
            return False
        now = sum(self.losses[-self.window :]) / self.window
        before = sum(self.losses[-2 * self.window : -self.window]) / self.window
        return abs(now - before) <= self.epsilon * abs(before)


def cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Yield batches forever from a re-iterable (a list, a DataLoader); a one-shot iterator ends when exhausted."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def count_tokens(batch: Batch) -> int:
    """Tokens in a batch: the attention mask's sum, else the number of input ids (or of labels, for non-LMs)."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids" if "input_ids" in batch else "labels"].numel())


def train_steps(
    model: nn.Module,
    batches: Iterator[Batch],
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    should_stop: Callable[[float], bool] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> StepStats:
    """Train for up to `max_steps` on `batches` (dicts with input_ids, attention_mask, labels).

    Each step minimises the model's own loss (`model(**batch).loss`) plus `penalty()`; `should_stop(loss)` may end
    the run early. Raises `FloatingPointError` naming the step if the loss stops being finite.
    """
    stats = StepStats()
    device = next(p.device for p in model.parameters())
    bar = tqdm(total=max_steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    stats.stop_reason = "data_exhausted"
    try:
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("The model returned no loss: every batch needs `labels`.")
            total = loss + penalty() if penalty is not None else loss
            value = float(loss.detach())
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(
                    f"{desc}: the loss became {float(total.detach())} at step {stats.steps + 1}; lower the learning "
                    "rate or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            stats.steps += 1
            stats.tokens += count_tokens(batch)
            stats.losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if should_stop is not None and should_stop(value):
                stats.stop_reason = "stable"
                break
            if stats.steps >= max_steps:
                stats.stop_reason = "max_steps"
                break
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats
