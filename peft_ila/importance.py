"""The ILA algorithm: which layers does alignment need to change?

Stage 1 trains adapters on every candidate layer until the loss is epsilon-stable (or a step cap). Stage 2 freezes
those updates dW_i and learns one gate g_i = sigmoid(s_i) per layer, minimising the task loss of W_i + g_i * dW_i
plus `sparsity_weight * mean(g)`. Layers are ranked by gate (ties: larger ||dW_i||); the top-k keep adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .config import resolve_top_k
from .distributed import agree_on
from .layer import ILALayer
from .mask import layer_of
from .model import _ila_tuner
from .training import Batch, StabilityTest, cycle, train_steps


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
) -> ILAResult:
    """Find the important layers of a probe-state ILA model and switch it to the selected state.

    Args:
        model: a `PeftModel` (or its `ILAModel`) made from an `ILAConfig` without `selected_layers`.
        batches: dicts with `input_ids`, `attention_mask`, `labels` ([batch, seq] long tensors). A list or a
            DataLoader is cycled as needed; a one-shot iterator may run out, which ends stage 1 early.
        adapter_name: the ILA adapter to work on; default the single active one.
        progress: show tqdm bars (step, loss, elapsed, ETA).
        accelerator: precision and gradient accumulation for both stages; default `Accelerator()`.

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
    candidates = tuner.ila_candidates[adapter]
    k = resolve_top_k(config.top_k, len(candidates))
    bank = tuner.ila_gates[adapter]
    layers = {name: m for name, m in tuner.model.named_modules() if isinstance(m, ILALayer) and adapter in m.ila_A}
    adapter_params = [
        p for m in layers.values() for p in (*m.ila_A[adapter].parameters(), *m.ila_B[adapter].parameters())
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not all(p.requires_grad for p in adapter_params):
        raise ValueError(f"ILA adapter '{adapter}' is frozen (inference mode); load it with is_trainable=True.")
    adapter_ids = {id(p) for p in adapter_params}
    others = {p: p.detach().clone() for p in trainable if id(p) not in adapter_ids}  # e.g. modules_to_save
    accelerator = accelerator or Accelerator()
    was_training = model.training
    devices = sorted({p.device.index for p in adapter_params if p.device.type == "cuda"})
    stream = cycle(batches)

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        for module in layers.values():  # stage 1 starts from fresh adapters drawn from the seed
            module.reset_adapter_parameters(adapter, config.init_weights)
        model.train()
        stage1 = train_steps(
            model,
            stream,
            torch.optim.AdamW(trainable, lr=config.stage1_lr, weight_decay=0.0),
            config.stage1_max_steps,
            accelerator=accelerator,
            should_stop=StabilityTest(config.stability_epsilon, config.stability_window).update,
            desc="ILA stage 1: adapters",
            progress=progress,
        )
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad():
            bank.logits.fill_(math.log(config.gate_init / (1 - config.gate_init)))
        bank.logits.requires_grad_(True)
        bank.active = True
        try:
            stage2 = train_steps(
                model,
                stream,
                torch.optim.Adam([bank.logits], lr=config.gate_lr),
                config.stage2_steps,
                accelerator=accelerator,
                penalty=lambda: config.sparsity_weight * bank.gates().mean(),
                desc="ILA stage 2: gates",
                progress=progress,
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
