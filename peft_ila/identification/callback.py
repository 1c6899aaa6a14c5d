"""Trainer callbacks: `ILACallback` (ILA inside `transformers.Trainer` and TRL's `SFTTrainer`, in one process,
under DDP or FSDP2) and `LayerwiseCallback` (sampled layerwise training, `tuner.layerwise`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft.tuners.adalora import AdaLoraModel
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..tuner.atomic import written_atomically
from ..tuner.layerwise import LayerSampler
from ..tuner.model import _ila_tuner
from ..tuner.sharding import is_sharded
from .importance import ILAResult, identify_important_layers

logger = logging.getLogger(__name__)
REPORT_NAME = "ila_importance.json"


class ILACallback(TrainerCallback):
    """Identify the important layers when `trainer.train()` starts, then fine-tune only those.

    With a model in the probe state (an `ILAConfig` without `selected_layers`), `on_train_begin` runs ILA (stage 1
    until epsilon-stable, stage 2) on the trainer's own training batches, with its precision and gradient
    accumulation; each rank reads its own shard and gradients are averaged, so every rank selects the same layers.
    The model then switches to the selected state and the trainer's optimizer keeps only the parameters that still
    train (the scheduler keeps its groups, so it stays valid). Identification steps are not counted in
    `state.global_step`: their cost is logged once as `ila/*` metrics, kept in `self.result`, and the main process
    writes it to `<output_dir>/ila_importance.json`. A model already in the selected state is left as it is: to
    resume from a checkpoint taken after selection, call `model.base_model.select_as_saved(checkpoint)` on the fresh
    probe model before `trainer.train(resume_from_checkpoint=checkpoint)`.

    Under FSDP2 (accelerate's `fsdp_version: 2`, or a model sharded with `fully_shard`) identification runs on the
    sharded probe as under `torchrun` (docs/ddp.md); the selected model keeps training in the same shards. FSDP1 and
    DeepSpeed are refused before anything runs, with the way that works (`unservable`).

    An AdaLoRA model (e.g. built with `Selection.to_peft_config(AdaLoraConfig(...))`) needs its
    `update_and_allocate(step)` after every optimizer step, which the Trainer does not call: this callback does, and
    identifies nothing for such a model.

    Args:
        trainer: the trainer, to log through its loggers (`report_to`) and use its accelerator; without it the
            metrics go to `state.log_history` only.
        adapter_name: the ILA adapter to work on; default the single active one.

    Example:
        ```py
        >>> trainer = Trainer(model=probe_model, args=args, train_dataset=ds, data_collator=collator)
        >>> trainer.add_callback(ILACallback(trainer))
        >>> trainer.train()  # identification first, then the fine-tune of the selected layers only
        ```
    """

    def __init__(self, trainer: Any = None, adapter_name: str | None = None) -> None:
        self.trainer = trainer
        self.adapter_name = adapter_name
        self.result: ILAResult | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if _allocator(model) is not None:  # AdaLoRA on a selection: nothing to identify
            return
        tuner = _ila_tuner(model)
        adapter = self.adapter_name or tuner._the_active_adapter()
        if tuner.peft_config[adapter].selected_layers is not None:
            return
        refusal = unservable(self.trainer, model)
        if refusal:
            raise ValueError(refusal)
        ddp = _maybe_under_ddp(model)
        if ddp and args.ddp_find_unused_parameters is False:
            raise ValueError(
                "ILACallback under DDP needs TrainingArguments(ddp_find_unused_parameters=None or True): after "
                "identification the unselected layers lose their adapters and DDP must not wait for their gradients. "
                "Or identify first (peft_ila.identify_important_layers) and build the Trainer on the selected model."
            )
        accelerator = self.trainer.accelerator if self.trainer is not None else Accelerator()
        accumulation = accelerator.gradient_accumulation_steps
        accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
        probe = [p for p in model.parameters() if p.requires_grad]
        try:  # the dataloader under the accelerate wrapper: this rank's shard, without touching its epoch count
            batches = getattr(train_dataloader, "base_dataloader", train_dataloader)
            self.result = identify_important_layers(model, batches, adapter, not args.disable_tqdm, accelerator)
        finally:  # the trainer divides its loss by this: give it back its own value
            accelerator.gradient_accumulation_steps = accumulation
        keep_trainable_only(optimizer, model)
        if ddp:
            _settle_ddp(probe, model)
        self._log(args, state, self.result)
        if args.should_save and args.output_dir:
            with written_atomically(Path(args.output_dir) / REPORT_NAME) as tmp:
                tmp.write_text(json.dumps(self.result.to_dict(), indent=2))

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """AdaLoRA's budget step, right after the optimizer's (its gradients are still there)."""
        allocate = _allocator(model)
        if allocate is not None:
            allocate(state.global_step)

    def _log(self, args: TrainingArguments, state: TrainerState, result: ILAResult) -> None:
        selection = result.selection
        metrics = {"ila/selected_layers": len(selection.selected), "ila/candidates": len(selection.candidates)}
        for name, stage in (("stage1", result.stage1), ("stage2", result.stage2)):
            for what in ("steps", "tokens", "seconds"):
                metrics[f"ila/{name}_{what}"] = getattr(stage, what)
            metrics[f"ila/{name}_final_loss"] = stage.losses[-1] if stage.losses else float("nan")
        metrics["ila/stage1_stable"] = float(result.stage1.stop_reason == "stable")
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})
        if state.is_world_process_zero:
            logger.info("ILA selected %d of %d layers: %s", len(selection.selected), len(selection.candidates), metrics)


class LayerwiseCallback(TrainerCallback):
    """Sampled layerwise training inside `transformers.Trainer`: before each optimizer step, `sampler.at_step`
    (every `interval` steps a new active set; only it trains; the optimizer state of groups that leave is dropped).
    A resumed run draws from its restored `global_step`, so it continues as the uninterrupted one.

    The trainer's optimizer is built before training starts, from the parameters that require gradients then: call
    `sampler.train_only_groups(model)` before creating the trainer.

    Example:
        ```py
        >>> sampler = LayerSampler(block_groups(model, candidates), LayerwiseConfig(active=2, interval=10))
        >>> sampler.train_only_groups(model)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LayerwiseCallback(sampler)])
        ```
    """

    def __init__(self, sampler: LayerSampler) -> None:
        self.sampler = sampler

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Refuse, with the fix, what would leave groups untrainable: DDP waiting for every gradient, an optimizer
        built without the groups."""
        optimizer = kw.get("optimizer")
        if _maybe_under_ddp(kw.get("model")) and args.ddp_find_unused_parameters is False:
            raise ValueError(
                "LayerwiseCallback under DDP needs TrainingArguments(ddp_find_unused_parameters=None or True): the "
                "groups outside the active set get no gradient, and DDP must not wait for them."
            )
        held = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
        missing = [p for p in self.sampler.parameters() if id(p) not in held]
        if optimizer is not None and missing:
            raise ValueError(
                f"The trainer's optimizer holds {len(held)} parameters but not {len(missing)} of the layerwise "
                "groups', so those could never train: call sampler.train_only_groups(model) before creating the "
                "Trainer (it builds its optimizer from the parameters that require gradients then)."
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """The active set of the step about to run (`global_step`: the optimizer steps done)."""
        self.sampler.at_step(state.global_step, kw.get("optimizer"))


def unservable(trainer: Any, model: nn.Module) -> str | None:
    """Why ILA cannot identify inside this trainer's setup (one line, with the way that works), else None: under
    DeepSpeed (any ZeRO stage: the engine holds the gradients and partitions, ILA's stages cannot train or read them)
    and under FSDP1 (flat parameters hide the adapter matrices). One process, DDP and FSDP2 are served."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return (
            "ILACallback cannot identify under DeepSpeed: its engine owns the gradients and (ZeRO-3) the weights, "
            "which ILA's two stages must train and read. Identify first in one process (identify_important_layers "
            "or `peft-ila identify`, on a 4-bit base if the model is large), then train "
            "Selection.to_peft_config(LoraConfig(...)) under DeepSpeed without this callback "
            "(examples/deepspeed_zero3.py)."
        )
    fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if fsdp1 or getattr(plugin, "fsdp_version", 2) != 2:
        return (
            "ILACallback works under FSDP2, not FSDP1, whose flat parameters hide the adapter matrices ILA scores: "
            "set TrainingArguments(fsdp_config={'fsdp_version': 2, ...}) or `fsdp_version: 2` in accelerate's config."
        )
    return None


def _maybe_under_ddp(model: nn.Module | None) -> bool:
    """Whether the trainer may have wrapped `model` in DDP: a process group is running (of one process too, as under
    `torchrun --nproc_per_node 1`) and its parameters are not sharded by FSDP2."""
    running = torch.distributed.is_available() and torch.distributed.is_initialized()
    return running and not any(is_sharded(p) for p in (model.parameters() if model is not None else ()))


def _allocator(model: nn.Module | None):
    """An AdaLoRA model's `update_and_allocate`, else None."""
    tuner = getattr(model, "base_model", None)
    return getattr(tuner, "update_and_allocate", None) if isinstance(tuner, AdaLoraModel) else None


def keep_trainable_only(optimizer: torch.optim.Optimizer | None, model: nn.Module) -> None:
    """Drop from `optimizer` (in place, so schedulers stay bound) every parameter of its groups that no longer
    trains in `model`, with its state: the adapters of unselected layers, and any gate."""
    if optimizer is None:
        return
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in keep:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in keep]


def _settle_ddp(probe: list[nn.Parameter], model: nn.Module) -> None:
    """The trainer's DDP wrapper registered every probe adapter and saw identification's backward passes use them;
    its first step then expects a gradient from each. The adapters that left the model get a zero gradient (DDP
    all-reduces it as an unused parameter's from then on; the optimizer no longer holds them)."""
    present = {id(p) for p in model.parameters()}
    for p in probe:
        if id(p) not in present:
            p.grad = torch.zeros_like(p)
