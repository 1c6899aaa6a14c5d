"""The ILA algorithm: which layers does alignment need to change?

Stage 1 trains adapters on every candidate layer until the loss is epsilon-stable (or a step cap). Stage 2 freezes
those updates dW_i and learns one gate g_i = sigmoid(s_i) per layer, minimising the task loss of W_i + g_i * dW_i
plus `sparsity_weight * mean(g)`. Layers are ranked by gate (ties: larger ||dW_i||); the top-k keep adapters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ._peft_compat import PREFIX
from .checkpoint import (
    DataPosition,
    check_settings,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    restore_rng,
    rng_tensors,
    save_checkpoint,
    weights_fingerprint,
)
from .config import ILAConfig, resolve_top_k
from .distributed import agree_on, rank, world_size
from .layer import ILALayer
from .mask import ILALoadError, layer_of
from .model import _ila_tuner
from .training import Batch, StabilityTest, StepStats, cycle, train_steps


@dataclass
class ILAResult:
    """Outcome of `identify_important_layers`, with what it cost."""

    scores: dict[str, float]  # layer -> learned gate in [0, 1]
    ranking: list[str]  # all candidate layers, most important first
    selected: list[str]  # the top-k of `ranking`
    update_norms: dict[str, float]  # layer -> ||dW|| after stage 1 (the tie-break)
    stage1_stop: str  # "stable" | "max_steps" | "data_exhausted"
    stage1_steps: int = 0
    stage1_tokens: int = 0
    stage1_seconds: float = 0.0
    stage2_steps: int = 0
    stage2_tokens: int = 0
    stage2_seconds: float = 0.0
    stage1_losses: list[float] = field(default_factory=list)
    stage2_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


def identify_important_layers(
    model: nn.Module,
    batches: Iterable[Batch],
    adapter_name: str | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
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

    Under several processes (`torchrun`, `accelerate launch`) every rank calls this with its own share of the data:
    gradients of both stages are averaged over ranks, and the selection is rank 0's, checked to be the same on every
    rank. Budget and selection come from the adapter's `ILAConfig`. Stage 1 starts from freshly initialised adapters
    drawn from `config.seed` (so the result depends only on model, data and config), and only adapter (and
    `modules_to_save`) weights train in it; stage 2 trains only the gates. Unless `keep_stage1_weights`, adapters and
    `modules_to_save` are reset before returning, so the fine-tune that follows starts from the base model.
    """
    tuner = _ila_tuner(model)
    adapter = adapter_name or tuner._the_active_adapter()
    config = tuner.peft_config[adapter]
    if config.selected_layers is not None:
        raise ValueError(
            f"ILA adapter '{adapter}' already has selected layers; to identify again, build a probe model with "
            "an ILAConfig whose `selected_layers` is None."
        )
    if adapter not in tuner.active_adapters:
        raise ValueError(f"ILA adapter '{adapter}' is not active; call model.set_adapter('{adapter}') first.")
    if checkpoint is not None and (type(checkpoint_every) is not int or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} is invalid: it must be an int >= 1 (optimizer steps).")
    candidates = tuner.ila_candidates[adapter]
    k = resolve_top_k(config.top_k, len(candidates))
    bank = tuner.ila_gates[adapter]
    layers = {name: m for name, m in tuner.model.named_modules() if isinstance(m, ILALayer) and adapter in m.ila_A}
    adapter_params = [
        p for m in layers.values() for p in (*m.ila_A[adapter].parameters(), *m.ila_B[adapter].parameters())
    ]
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable = list(named.values())
    if not all(p.requires_grad for p in adapter_params):
        raise ValueError(f"ILA adapter '{adapter}' is frozen (inference mode); load it with is_trainable=True.")
    adapter_ids = {id(p) for p in adapter_params}
    others = {p: p.detach().clone() for p in trainable if id(p) not in adapter_ids}  # e.g. modules_to_save
    accelerator = accelerator or Accelerator()
    was_training = model.training
    devices = sorted({p.device.index for p in adapter_params if p.device.type == "cuda"})
    stream = cycle(batches)
    if checkpoint is not None:  # count and fingerprint the batches, and note what a resumed run must share
        stream = DataPosition(stream)
        settings = _settings(model, config, candidates, accelerator)
    saved = None
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs the `checkpoint` file of the interrupted run.")
        saved = load_checkpoint(checkpoint)
        check_settings(Path(checkpoint), saved[1]["settings"], settings)
    stage1, stage2 = StepStats(), StepStats()
    optimizer1 = torch.optim.AdamW(trainable, lr=config.stage1_lr, weight_decay=0.0)
    optimizer2 = torch.optim.Adam([bank.logits], lr=config.gate_lr)

    def save(stats: StepStats) -> None:
        if checkpoint is None or not (stats.steps % checkpoint_every == 0 or stats.stop_reason):
            return
        position = stream.record()  # a collective: every rank takes part
        if rank() > 0:
            return
        tensors = {**{f"param.{n}": p for n, p in named.items()}, "gates": bank.logits, **rng_tensors(devices)}
        groups = {}
        for name, optimizer in (("optimizer1", optimizer1), ("optimizer2", optimizer2)):
            state, groups[name] = optimizer_tensors(optimizer, name)
            tensors.update(state)
        record = {"settings": settings, "position": position, "groups": groups}
        record.update(stage1=dataclasses.asdict(stage1), stage2=dataclasses.asdict(stage2))
        save_checkpoint(checkpoint, tensors, record)

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        for module in layers.values():  # stage 1 starts from fresh adapters drawn from the seed
            module.reset_adapter_parameters(adapter, config.init_weights)
        if saved is not None:
            stage1, stage2 = _restore(saved, checkpoint, named, bank, optimizer1, optimizer2, stream, devices)
        model.train()
        if not stage1.stop_reason:
            test = StabilityTest(config.stability_epsilon, config.stability_window)
            test.losses = list(stage1.losses)
            stage1 = train_steps(
                model,
                stream,
                optimizer1,
                config.stage1_max_steps,
                accelerator=accelerator,
                should_stop=test.update,
                on_step=save,
                desc="ILA stage 1: adapters",
                progress=progress,
                resume=stage1,
            )
        for p in trainable:
            p.requires_grad_(False)
        if not stage2.steps:
            with torch.no_grad():
                bank.logits.fill_(math.log(config.gate_init / (1 - config.gate_init)))
        bank.logits.requires_grad_(True)
        bank.active = True
        try:
            if not stage2.stop_reason:
                stage2 = train_steps(
                    model,
                    stream,
                    optimizer2,
                    config.stage2_steps,
                    accelerator=accelerator,
                    penalty=lambda: config.sparsity_weight * bank.gates().mean(),
                    on_step=save,
                    desc="ILA stage 2: gates",
                    progress=progress,
                    resume=stage2,
                )
        finally:
            bank.active = False
            bank.logits.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
        if stage2.steps == 0:
            raise ValueError(
                "The batches ran out before stage 2; pass a list or a DataLoader (they are cycled) or more data."
            )
        gates = bank.gates().detach().float().cpu().tolist()

    squares = dict.fromkeys(candidates, 0.0)
    for name, module in layers.items():
        squares[layer_of(name, config.granularity)] += module.update_norm(adapter) ** 2
    norms = {name: math.sqrt(sq) for name, sq in squares.items()}
    scores = dict(zip(candidates, gates, strict=True))
    order = {name: i for i, name in enumerate(candidates)}
    ranking = sorted(candidates, key=lambda n: (-scores[n], -norms[n], order[n]))
    ranking, scores = agree_on(ranking, scores, k)  # decided on rank 0, checked on every rank
    if not config.keep_stage1_weights:
        with torch.no_grad():
            for p, value in others.items():
                p.copy_(value)
    tuner.select_layers(ranking[:k], scores, adapter, keep_weights=config.keep_stage1_weights)
    model.train(was_training)
    return ILAResult(
        scores=scores,
        ranking=ranking,
        selected=ranking[:k],
        update_norms=norms,
        stage1_stop=stage1.stop_reason,
        stage1_steps=stage1.steps,
        stage1_tokens=stage1.tokens,
        stage1_seconds=stage1.seconds,
        stage2_steps=stage2.steps,
        stage2_tokens=stage2.tokens,
        stage2_seconds=stage2.seconds,
        stage1_losses=stage1.losses,
        stage2_losses=stage2.losses,
    )


def _settings(model: nn.Module, config: ILAConfig, candidates: list[str], accelerator: Accelerator) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint, the frozen base weights included."""
    base = ((n, p) for n, p in model.named_parameters() if not p.requires_grad and PREFIX not in n)
    return {
        "base_weights": weights_fingerprint(base),
        "config": config.run_settings(),
        "candidates": candidates,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "mixed_precision": str(accelerator.mixed_precision),
        "processes": world_size(),
    }


def _restore(saved, path, named, bank, optimizer1, optimizer2, stream, devices) -> tuple[StepStats, StepStats]:
    """Put a checkpoint's weights, optimizer states, data position and RNG state back; return the stage stats."""
    tensors, record = saved
    missing = sorted(n for n in named if f"param.{n}" not in tensors)
    if missing:
        raise ILALoadError(f"{path} holds no weights for {missing[:3]}; it was written for another model or adapter.")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param.{name}"])
        bank.logits.copy_(tensors["gates"])
    stage1 = StepStats(**record["stage1"])
    stage2 = StepStats(**record["stage2"])
    for name, optimizer in (("optimizer1", optimizer1), ("optimizer2", optimizer2)):
        load_optimizer(optimizer, tensors, name, record["groups"][name])
    stream.skip_to(record["position"], Path(path))
    restore_rng(tensors, devices)
    return stage1, stage2
