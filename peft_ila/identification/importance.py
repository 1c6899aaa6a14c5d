"""The ILA recipe: which layers does alignment need to change?

Stage 1 trains adapters on every candidate layer for `stage1_max_steps` steps (or until the loss is epsilon-stable, if
that test is on). Then an importance estimator (`estimators.py`) scores every layer: by default the first-order
estimate of how much each frozen update dW_i lowers the loss; or the paper's stage 2, which learns one gate
g_i = sigmoid(s_i) per layer, minimising the task loss of W_i + g_i * dW_i plus `sparsity_weight * mean(g)`. Layers
are ranked by score (ties: larger ||dW_i||); the top-k keep adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..tuner._peft_compat import PREFIX
from ..tuner.config import ILAConfig, resolve_top_k
from ..tuner.layer import ILALayer
from ..tuner.model import _ila_tuner
from ..tuner.selection import Selection, as_float32, layer_of, model_identity, weights_fingerprint
from ..tuner.sharding import is_sharded, reread_trainable
from .checkpoint import (
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
from .cost import StepCost, measure_step_cost, within_budget
from .distributed import agree_on, gather, rank, world_size
from .estimators import ESTIMATORS, membership_confidence
from .training import Batch, StabilityTest, StepStats, cycle, train_steps


@dataclass
class ILAResult:
    """Outcome of `identify_important_layers`: the selection, and what each stage did and cost."""

    selection: Selection  # candidates, scores in [0, 1] of the estimator, ranking, the top k, provenance
    update_norms: dict[str, float]  # layer -> ||dW|| after stage 1 (the tie-break)
    stage1: StepStats = field(default_factory=StepStats)  # stop_reason: stable | max_steps | data_exhausted | skipped
    stage2: StepStats = field(default_factory=StepStats)  # the estimator's stage (no steps for "update-norm")

    @property
    def scores(self) -> dict[str, float]:
        """Layer -> score in [0, 1] of the estimator (higher: more important)."""
        return dict(self.selection.scores)

    @property
    def ranking(self) -> list[str]:
        """Every candidate layer, most important first."""
        return list(self.selection.ranking)

    @property
    def selected(self) -> list[str]:
        """The top k of `ranking`: the layers that keep adapters."""
        return list(self.selection.selected)

    def to_dict(self) -> dict:
        """Plain JSON: the selection's fields, `update_norms`, and the stages as nested dicts."""
        stages = {"stage1": dataclasses.asdict(self.stage1), "stage2": dataclasses.asdict(self.stage2)}
        return {**self.selection.to_json(), "update_norms": self.update_norms, **stages}


SHARDED_CHECKPOINT = (
    "checkpoints of an identification on a model sharded by FSDP2 are not supported yet: pass checkpoint=None (the "
    "CLI: --checkpoint-every 0), or identify unsharded (one process or DDP) to checkpoint and resume."
)


def identify_important_layers(
    model: nn.Module,
    batches: Iterable[Batch],
    adapter_name: str | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    train_stage1: bool = True,
) -> ILAResult:
    """Find the important layers of a probe-state ILA model and switch it to the selected state.

    Args:
        model: a `PeftModel` (or its `ILAModel`) made from an `ILAConfig` without `selected_layers`.
        batches: dicts with `input_ids`, `attention_mask`, `labels` ([batch, seq] long tensors). A list or a
            DataLoader is cycled as needed; a one-shot iterator may run out, which ends stage 1 early.
        adapter_name: the ILA adapter to work on; default the single active one.
        progress: show tqdm bars (step, loss, elapsed, ETA).
        accelerator: precision and gradient accumulation for both stages; default `Accelerator()`.
        checkpoint: a `.safetensors` file to save the run's state to (by the main process) every
            `checkpoint_every` optimizer steps and at the end of each stage; None: no checkpoints. The file is left
            in place when the run ends (the CLI removes it once the run directory is written).
        resume: continue the run saved in `checkpoint` (same model, data, config and processes; checked). The
            result is bit for bit that of an uninterrupted run when `batches` replay in the same order (a list, or
            a DataLoader whose shuffling has its own seeded generator).
        train_stage1: False: score the adapters as they are (trained elsewhere, e.g. the stage-1 weights of an
            earlier run loaded into this probe model) and run only the estimator's stage; `result.stage1` is then
            empty, with stop_reason "skipped".

    Under several processes (`torchrun`, `accelerate launch`) every rank calls this with its own share of the data:
    gradients of both stages are averaged over ranks, and the selection is rank 0's, checked to be the same on every
    rank. Budget and selection come from the adapter's `ILAConfig`. Stage 1 starts from freshly initialised adapters
    drawn from `config.seed` (so the result depends only on model, data and config), and only adapter (and
    `modules_to_save`) weights train in it; stage 2 trains only the gates. Unless `keep_stage1_weights`, adapters and
    `modules_to_save` are reset before returning, so the fine-tune that follows starts from the base model.
    On a model sharded by FSDP2 (`fully_shard`, every block then the root) the same holds: FSDP averages the
    gradients, adapters are initialised on whole tensors, norms and scores read gathered ones, so every rank ends
    with the selection (and the scores) of the unsharded run; the sharded model stays trainable (its parameter groups
    keep the dropped adapters' shards, which no longer compute). Save it from a full state dict (docs/ddp.md).
    Checkpoints are not supported there yet.
    """
    if checkpoint is not None and any(is_sharded(p) for p in model.parameters()):
        raise ValueError(SHARDED_CHECKPOINT)
    recipe = Identification(model, adapter_name, accelerator, checkpoint, checkpoint_every, train_stage1)
    return recipe.run(batches, progress, resume)


class Identification:
    """One identification run of an ILA adapter, with all its state: the adapters and gates (in the model), both
    stages' optimizers and step statistics, the estimator, and the data position. `run` carries it out; every
    step may be saved to, and a run continued from, one checkpoint file, and `on_step(stats)` is called after it
    (`stage` tells it which stage's step: 1, the adapters', or 2, the estimator's)."""

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str | None = None,
        accelerator: Accelerator | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        train_stage1: bool = True,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.model, self.tuner = model, _ila_tuner(model)
        self.on_step = on_step
        self.train_stage1 = train_stage1
        self.adapter = adapter_name or self.tuner._the_active_adapter()
        self.config: ILAConfig = self.tuner.peft_config[self.adapter]
        self._check(checkpoint, checkpoint_every)
        self.candidates = self.tuner.ila_candidates[self.adapter]
        self.k = resolve_top_k(self.config.top_k, len(self.candidates))
        self.bank = self.tuner.ila_gates[self.adapter]
        self.layers = {
            name: m
            for name, m in self.tuner.model.named_modules()
            if isinstance(m, ILALayer) and self.adapter in m.ila_A
        }
        adapter_params = [
            p
            for m in self.layers.values()
            for p in (*m.ila_A[self.adapter].parameters(), *m.ila_B[self.adapter].parameters())
        ]
        if not all(p.requires_grad for p in adapter_params):
            raise ValueError(
                f"ILA adapter '{self.adapter}' is frozen (inference mode); load it with is_trainable=True."
            )
        self.named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        adapter_ids = {id(p) for p in adapter_params}
        # what trains besides the adapters (modules_to_save), put back after identification
        self.others = {p: p.detach().clone() for p in self.named.values() if id(p) not in adapter_ids}
        self.devices = sorted({p.device.index for p in adapter_params if p.device.type == "cuda"})
        self.accelerator = accelerator or Accelerator()
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.estimator = ESTIMATORS[self.config.estimator](self.config)
        self.optimizer1 = torch.optim.AdamW(list(self.named.values()), lr=self.config.stage1_lr, weight_decay=0.0)
        self.optimizer2 = self.estimator.optimizer(self.bank)
        self.stage1, self.stage2 = StepStats(), StepStats()
        self.stage = 0  # the stage under way: 1 (the adapters), 2 (the estimator's); 0 before them
        self.stream: DataPosition | None = None
        self.settings: dict | None = None  # what a resumed run must share (only with a checkpoint)

    def _check(self, checkpoint, checkpoint_every) -> None:
        if self.config.selected_layers is not None:
            raise ValueError(
                f"ILA adapter '{self.adapter}' already has selected layers; to identify again, build a probe model "
                "with an ILAConfig whose `selected_layers` is None."
            )
        if self.adapter not in self.tuner.active_adapters:
            raise ValueError(
                f"ILA adapter '{self.adapter}' is not active; call model.set_adapter('{self.adapter}') first."
            )
        if checkpoint is not None and (type(checkpoint_every) is not int or checkpoint_every < 1):
            raise ValueError(
                f"checkpoint_every={checkpoint_every!r} is invalid: it must be an int >= 1 (optimizer steps)."
            )

    def run(self, batches: Iterable[Batch], progress: bool = True, resume: bool = False) -> ILAResult:
        """Stage 1, the estimator's stage, ranking and selection; see `identify_important_layers`."""
        self.stream = DataPosition(cycle(batches))  # counts and fingerprints the batches read
        saved = None
        if self.checkpoint is not None:  # note what a resumed run must share
            self.settings = self._settings()
            if resume:
                saved = self._load_checkpoint()
        elif resume:
            raise ValueError("resume=True needs the `checkpoint` file of the interrupted run.")
        was_training = self.model.training
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.config.seed)
            if self.train_stage1:  # stage 1 starts from fresh adapters drawn from the seed
                for module in self.layers.values():
                    module.reset_adapter_parameters(self.adapter, self.config.init_weights)
            else:
                self.stage1 = StepStats(stop_reason="skipped")
            if saved is not None:
                self._restore(saved)
            self.model.train()
            self._stage1(progress)
            scores = self._estimate(progress)
            cost = self._measure_cost() if self.config.budget is not None else None
        result = self._select(scores, cost)
        self.model.train(was_training)
        return result

    def _stage1(self, progress: bool) -> None:
        self.stage = 1
        if self.stage1.stop_reason:
            return
        test = None
        if self.config.stability_epsilon > 0:
            test = StabilityTest(self.config.stability_epsilon, self.config.stability_window)
            test.losses = list(self.stage1.losses)
        self.stage1 = train_steps(
            self.model,
            self.stream,
            self.optimizer1,
            self.config.stage1_max_steps,
            accelerator=self.accelerator,
            should_stop=test.update if test is not None else None,
            on_step=self._after_step,
            desc="ILA stage 1: adapters",
            progress=progress,
            resume=self.stage1,
        )

    def _estimate(self, progress: bool) -> list[float]:
        """The estimator's stage (if it has one and it is not done), then its scores in candidate order."""
        steps, self.stage = self.estimator.steps(), 2
        with self.tuner.gate_stage(self.adapter) as bank:
            reread_trainable(self.model)
            if steps and not self.stage2.steps:
                self.estimator.start(bank)
            if steps and not self.stage2.stop_reason:
                self.stage2 = train_steps(
                    self.model,
                    self.stream,
                    self.optimizer2,
                    steps,
                    accelerator=self.accelerator,
                    penalty=self.estimator.penalty(bank),
                    on_step=self._after_step,
                    desc=self.estimator.desc,
                    progress=progress,
                    resume=self.stage2,
                )
            if steps and self.stage2.steps == 0:
                raise ValueError(
                    "The batches ran out before stage 2; pass a list or a DataLoader (they are cycled) or more data."
                )
            scores = self.estimator.scores(bank, self.optimizer2, list(self.update_norms().values()))
        reread_trainable(self.model)
        return scores

    def update_norms(self) -> dict[str, float]:
        """||dW|| of every candidate layer (root of the sum of squares over its modules)."""
        squares = dict.fromkeys(self.candidates, 0.0)
        for name, module in self.layers.items():
            squares[layer_of(name, self.config.granularity)] += module.update_norm(self.adapter) ** 2
        return {name: math.sqrt(sq) for name, sq in squares.items()}

    def _measure_cost(self) -> StepCost:
        """The step-cost model of a cost-aware selection (`cost.py`), measured on the next batch; rank 0's."""
        batch = next(iter(self.stream), None)
        if batch is None:
            raise ValueError("The batches ran out before the step cost could be measured; pass a list or more data.")
        return gather(measure_step_cost(self.model, batch, self.adapter))[0]

    def _select(self, gates: list[float], cost: StepCost | None = None) -> ILAResult:
        """Rank by score (ties: larger ||dW||, then candidate order), agree across ranks, keep the top k (within
        the config's budget under `cost`, when it has one)."""
        norms = self.update_norms()
        scores = {name: as_float32(score) for name, score in zip(self.candidates, gates, strict=True)}
        order = {name: i for i, name in enumerate(self.candidates)}
        ranking = sorted(self.candidates, key=lambda n: (-scores[n], -norms[n], order[n]))
        ranking, scores = agree_on(ranking, scores, self.k)  # decided on rank 0, checked on every rank
        fields = (scores, tuple(ranking), self._provenance(), self._confidence(ranking[: self.k]))
        selection = Selection(tuple(self.candidates), tuple(ranking[: self.k]), *fields)
        if cost is not None:
            selection = within_budget(selection, cost, self.config.budget, self.k)
        if not self.config.keep_stage1_weights:
            with torch.no_grad():
                for p, value in self.others.items():
                    p.copy_(value)
        self.tuner.select_layers(selection, adapter_name=self.adapter, keep_weights=self.config.keep_stage1_weights)
        reread_trainable(self.model)
        return ILAResult(selection, norms, self.stage1, self.stage2)

    def _confidence(self, selected: list[str]) -> dict[str, float]:
        """Per layer, the fraction of bootstrap resamples of the estimator's steps that agree on its membership in
        `selected`; empty when the estimator has no steps to resample."""
        state = self.optimizer2.state.get(self.bank.logits, {}) if self.optimizer2 is not None else {}
        if "history" not in state:
            return {}
        kept = set(selected)
        chosen = torch.tensor([name in kept for name in self.candidates])
        agree = membership_confidence(self.estimator, state["history"].cpu(), chosen, self.config.seed)
        return {} if agree is None else dict(zip(self.candidates, agree, strict=True))

    def _provenance(self) -> dict:
        """Where the selection comes from: estimator, settings, base model, and the batches read (on every rank)."""
        position = self.stream.record()  # a collective: every rank takes part
        data = hashlib.sha256("".join(position["digests"]).encode()).hexdigest()
        return {
            "estimator": self.config.estimator,
            "settings": self.config.run_settings(),
            "base_model": model_identity(self.model),
            "data": {"micro_batches": position["micro_batches"], "sha256": data},
        }

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer1": self.optimizer1, **({"optimizer2": self.optimizer2} if self.optimizer2 else {})}

    def _after_step(self, stats: StepStats) -> None:
        """After every optimizer step of either stage (`stats`: that stage's so far): the checkpoint, then the caller's
        `on_step` hook, which may read the run's state (`update_norms()`, the model's adapters) but not change it."""
        self._save(stats)
        if self.on_step is not None:
            self.on_step(stats)

    def _save(self, stats: StepStats) -> None:
        """Checkpoint every `checkpoint_every` optimizer steps and at the end of each stage (rank 0 writes)."""
        if self.checkpoint is None or not (stats.steps % self.checkpoint_every == 0 or stats.stop_reason):
            return
        position = self.stream.record()  # a collective: every rank takes part
        if rank() > 0:
            return
        tensors = {**parameter_tensors(self.named), "gates": self.bank.logits}
        tensors.update(rng_tensors(self.devices))
        groups = {}
        for name, optimizer in self._optimizers().items():
            state, groups[name] = optimizer_tensors(optimizer, name)
            tensors.update(state)
        record = {"settings": self.settings, "position": position, "groups": groups}
        record.update(stage1=dataclasses.asdict(self.stage1), stage2=dataclasses.asdict(self.stage2))
        save_checkpoint(self.checkpoint, tensors, record)

    def _settings(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint, the frozen base weights included."""
        base = ((n, p) for n, p in self.model.named_parameters() if not p.requires_grad and PREFIX not in n)
        return {
            "base_weights": weights_fingerprint(base),
            "config": self.config.run_settings(),
            "candidates": self.candidates,
            "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps,
            "mixed_precision": str(self.accelerator.mixed_precision),
            "processes": world_size(),
            **({} if self.train_stage1 else {"train_stage1": False}),
        }

    def _load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The checkpoint to resume from, the same on every rank: all wait until each has reached this point (so the
        rank that writes checkpoints has finished its last one, even when the interrupted run stopped in this same
        process group), and a rank that read another step of the run is an error on every rank."""
        saved = load_checked(self.checkpoint, self.settings)
        record = saved[1]
        steps = gather((record["stage1"]["steps"], record["stage2"]["steps"]))
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"ILA ranks read different checkpoints from {self.checkpoint} (stage 1 and 2 steps per rank: {steps}): "
                "every rank must see the same file; resume from a shared file system."
            )
        return saved

    def _restore(self, saved: tuple[dict[str, torch.Tensor], dict]) -> None:
        """Put a checkpoint's weights, optimizer states, step statistics, data position and RNG state back."""
        tensors, record = saved
        restore_parameters(self.named, tensors, Path(self.checkpoint))
        with torch.no_grad():
            self.bank.logits.copy_(tensors["gates"])
        self.stage1, self.stage2 = StepStats(**record["stage1"]), StepStats(**record["stage2"])
        for name, optimizer in self._optimizers().items():
            load_optimizer(optimizer, tensors, name, record["groups"][name])
        self.stream.skip_to(record["position"], Path(self.checkpoint))
        restore_rng(tensors, self.devices)
