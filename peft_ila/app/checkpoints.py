"""The fine-tune's checkpoint: its state saved every N optimizer steps (and before the first), so that an interrupted
`train` continues where it stopped and writes the adapter an uninterrupted run would have written, bit for bit.

One safetensors file, written atomically by the main process (see `identification.checkpoint`): the trainable
parameters by name, the optimizer's state, the random-number generators; in its JSON record the schedule, the step
statistics, the data position, the held-out loss before, the settings a resumed run must share, and the caller's
`notes` (what it needs back on resume without redoing the work before the fine-tune); beside the state, the caller's
`kept` tensors (what it holds that the fine-tune does not, such as the best weights so far).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..identification.checkpoint import (
    FINETUNE_FORMAT,
    DataPosition,
    load_checked,
    load_optimizer,
    optimizer_tensors,
    parameter_tensors,
    restore_parameters,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from ..identification.distributed import rank
from ..identification.training import StepStats
from ..tuner.layerwise import LayerSampler
from ..tuner.selection import weights_fingerprint


@dataclass(frozen=True)
class FinetuneCheckpoint:
    """Where a fine-tune saves its state (`path`) and how often (`every` optimizer steps, >= 1); `resume`: continue
    the fine-tune saved there; `notes`: JSON-able facts the caller keeps in the file (read them back with
    `identification.checkpoint.checkpoint_record(path)["notes"]`); `kept`: the caller's tensors by name, saved as
    they are at every save (change them in place) and copied back into them on resume. The caller may change both
    in `finetune`'s `on_step`: a save comes after it."""

    path: Path
    every: int = 10
    resume: bool = False
    notes: dict = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


class FinetuneState:
    """A running fine-tune's state, as its checkpoint holds it: the parameters that train, the optimizer and its
    schedule, the data position, the generators, the layer sampler's peak, and the held-out loss before."""

    def __init__(
        self,
        checkpoint: FinetuneCheckpoint,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler,
        stream: DataPosition,
        settings: dict,
        sampler: LayerSampler | None = None,
    ) -> None:
        ids = {id(p) for p in params}
        self.checkpoint, self.optimizer, self.scheduler, self.stream = checkpoint, optimizer, scheduler, stream
        self.sampler = sampler
        self.named = {name: p for name, p in model.named_parameters() if id(p) in ids}
        frozen = ((name, p) for name, p in model.named_parameters() if id(p) not in ids)
        self.devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
        self.settings = {
            **settings,
            "base_weights": weights_fingerprint(frozen),
            "trainable": {name: list(p.shape) for name, p in self.named.items()},
        }
        self.loss_before: float | None = None

    def save_if_due(self, stats: StepStats) -> None:
        """After an optimizer step (and with no steps before the first): save every `every` steps and at the end."""
        if stats.steps % self.checkpoint.every == 0 or stats.stop_reason:
            self.save(stats)

    def save(self, stats: StepStats) -> None:
        position = self.stream.record()  # a collective: every rank takes part
        if rank() > 0:
            return
        state, groups = optimizer_tensors(self.optimizer, "optimizer")
        kept = parameter_tensors(self.checkpoint.kept, prefix="kept")
        tensors = {**parameter_tensors(self.named), **state, **rng_tensors(self.devices), **kept}
        record = {
            "settings": self.settings,
            "notes": self.checkpoint.notes,
            "position": position,
            "groups": groups,
            "schedule": self.scheduler.state_dict(),
            "stats": dataclasses.asdict(stats),
            "loss_before": self.loss_before,
            "most_active": self.sampler.most_active if self.sampler is not None else None,
        }
        save_checkpoint(self.checkpoint.path, tensors, record, FINETUNE_FORMAT)

    def restore(self) -> StepStats:
        """Put the checkpoint's state back (refused, naming the difference, if it was written with other settings or
        data); the step statistics so far. Sets `loss_before` (None if the run stopped before measuring it)."""
        path = Path(self.checkpoint.path)
        tensors, record = load_checked(path, self.settings, FINETUNE_FORMAT)
        restore_parameters(self.named, tensors, path)
        restore_parameters(self.checkpoint.kept, tensors, path, prefix="kept")
        stats = StepStats(**record["stats"])
        if self.sampler is not None:  # the active set of the next step, as the interrupted run had drawn it
            self.sampler.at_step(stats.steps, self.optimizer)
            self.sampler.most_active = record["most_active"]
        load_optimizer(self.optimizer, tensors, "optimizer", record["groups"])
        self.scheduler.load_state_dict(record["schedule"])
        self.stream.skip_to(record["position"], path)
        restore_rng(tensors, self.devices)
        self.loss_before = record["loss_before"]
        return stats
