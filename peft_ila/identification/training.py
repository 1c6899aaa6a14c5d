"""The one training loop: identification's two stages, fine-tuning and the benchmarks all step through here.

Precision and gradient accumulation are accelerate's (`Accelerator.autocast`, `accumulate`, `backward`); this module
decides what one step is and when to stop. Under several processes (`torchrun`, `accelerate launch`) each rank
feeds its own batches, gradients are averaged over ranks (unless the model is already wrapped in DDP) and the
step loss is the mean over ranks, so every rank stops at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from peft import PeftModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .distributed import any_rank, average_gradients, sum_over_ranks, world_size

Batch = dict[str, torch.Tensor]


@dataclass
class StepStats:
    """What a run of `train_steps` did: optimizer steps, tokens seen (by all ranks), seconds, per-step loss (mean
    over ranks) and time, why it stopped ("max_steps", "stable" or "data_exhausted"; "" while running), and the
    micro-batches this rank read: where in its data order whatever trains next goes on."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stop_reason: str = ""
    micro_batches: int = 0


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


def _to_device(batch: Batch, model: nn.Module) -> Batch:
    device = next(p.device for p in model.parameters())
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_steps(
    model: nn.Module,
    batches: Iterator[Batch],
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    accelerator: Accelerator | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    should_stop: Callable[[float], bool] | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    resume: StepStats | None = None,
) -> StepStats:
    """Train for up to `max_steps` optimizer steps on `batches` (dicts with input_ids, attention_mask, labels).

    Each step minimises the model's own loss (`model(**batch).loss`) plus `penalty()`, over
    `accelerator.gradient_accumulation_steps` micro-batches; `should_stop(mean step loss)` may end the run early and
    `on_step(stats so far)` runs after every step, once its stop reason is decided (e.g. to change which parameters
    train, or to checkpoint); `after_step(steps done before it)` runs right after each optimizer step, while the
    gradients are still there (AdaLoRA's `update_and_allocate` reads them). `resume`: the stats of an interrupted
    run to continue (steps count on from there). Batches go to the model's device; under several processes each
    rank passes its own share and gradients are averaged at every step (see the module docstring). Raises
    `FloatingPointError` naming the step if the loss stops being finite on any rank.
    """
    accelerator = accelerator or Accelerator()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sync_here = not isinstance(model, DistributedDataParallel)  # DDP averages gradients itself
    # not accelerator.prepare_*: that would keep this run's optimizer (and its state) alive in the accelerator
    optimizer = AcceleratedOptimizer(optimizer, device_placement=False, scaler=accelerator.scaler)
    accelerator.step = 0  # align accumulation boundaries with this run's first micro-batch
    stats, micro, micro_tokens = resume or StepStats(), [], 0
    previous_seconds = stats.seconds
    shown = progress and accelerator.is_local_main_process
    bar = tqdm(total=max_steps, initial=stats.steps, desc=desc, disable=not shown, leave=False)
    start = step_start = time.perf_counter()
    try:
        for batch in batches:
            batch = _to_device(batch, model)
            with accelerator.accumulate(model):
                loss = _micro_step(model, batch, accelerator, penalty, f"{desc}: the loss", stats.steps + 1)
                if accelerator.sync_gradients and sync_here:
                    average_gradients(params)
                optimizer.step()
                if scheduler is not None and accelerator.sync_gradients and not optimizer.step_was_skipped:
                    scheduler.step()
                if after_step is not None and accelerator.sync_gradients:
                    after_step(stats.steps)
                optimizer.zero_grad(set_to_none=True)
            micro.append(loss)
            micro_tokens += count_tokens(batch)
            stats.micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            loss_sum, tokens = sum_over_ranks(sum(micro) / len(micro), micro_tokens)
            value = loss_sum / world_size()
            micro, micro_tokens = [], 0
            now = time.perf_counter()
            stats.steps += 1
            stats.tokens += int(tokens)
            stats.losses.append(value)
            stats.step_seconds.append(now - step_start)
            stats.seconds = previous_seconds + now - start
            step_start = now
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if should_stop is not None and should_stop(value):
                stats.stop_reason = "stable"
            elif stats.steps >= max_steps:
                stats.stop_reason = "max_steps"
            if on_step is not None:
                on_step(stats)
            if stats.stop_reason:
                break
    finally:
        bar.close()
        stats.seconds = previous_seconds + time.perf_counter() - start
    if micro_tokens:  # the data ran out inside an accumulation window: those micro-batches were seen too
        stats.tokens += int(sum_over_ranks(micro_tokens)[0])
    stats.stop_reason = stats.stop_reason or "data_exhausted"
    return stats


def _micro_step(model, batch: Batch, accelerator, penalty, what: str, step: int) -> float:
    """Forward and backward of one micro-batch (loss plus penalty); its loss. Raises `FloatingPointError` naming the
    step if the loss is not finite on any rank."""
    with accelerator.autocast():
        loss = model(**batch).loss
        if loss is None:
            raise ValueError("The model returned no loss: every batch needs `labels`.")
        total = loss + penalty() if penalty is not None else loss
    value = float(total.detach())
    if any_rank(not math.isfinite(value)):
        how = f"became {value}" if not math.isfinite(value) else "became non-finite on another rank"
        raise FloatingPointError(f"{what} {how} at step {step}; lower the learning rate or check the data.")
    accelerator.backward(total)
    return float(loss.detach())


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], accelerator: Accelerator | None = None, progress: bool = False
) -> float:
    """Mean loss per predicted label token over `batches` (the model's own shifted-label loss, token-weighted); under
    several processes, over the union of every rank's batches. A `PeftModel` is evaluated through the model it
    wraps (adapters applied), so a tuner's own additions to the training loss (AdaLoRA's orthogonality penalty) are
    not counted."""
    accelerator = accelerator or Accelerator()
    was_training = model.training
    model.eval()
    net = model.get_base_model() if isinstance(model, PeftModel) else model
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc="held-out loss", disable=not progress, leave=False):
            batch = _to_device(batch, model)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            with accelerator.autocast():
                total += float(net(**batch).loss) * n
            count += n
    finally:
        model.train(was_training)
    total, count = sum_over_ranks(total, count)
    if count == 0:
        raise ValueError("No label tokens to evaluate on.")
    return total / count
