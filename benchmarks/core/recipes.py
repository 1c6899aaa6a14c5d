"""What several studies compute the same way: ILA's mask with the library's defaults, brief training for step time
and memory, and the process's memory while a block runs."""

from __future__ import annotations

import threading

import torch
from peft import get_peft_model

from peft_ila import ILAConfig, ILAResult, LayerSampler, identify_important_layers
from peft_ila.app.files import peak_memory_mb, reset_peak_memory, status_mb
from peft_ila.identification.training import cycle, train_steps


def default_probe(model: torch.nn.Module, stage1: int, stage2: int, adapter: dict, seed: int = 0) -> torch.nn.Module:
    """`model` wrapped for ILA with the library's defaults, `adapter` shape, stage budgets `stage1` + `stage2`
    steps, top 25% and identification `seed`."""
    budget = dict(stage1_max_steps=stage1, stage2_steps=stage2, top_k=0.25, seed=seed)
    return get_peft_model(model, ILAConfig(task_type="CAUSAL_LM", **adapter, **budget))


def default_identification(probe: torch.nn.Module, batches, progress: bool) -> tuple[ILAResult, dict]:
    """Identification on a `default_probe`: the `ILAResult` and what a mask cell keeps (`selection` as JSON,
    `seconds`, `tokens` of both stages)."""
    result = identify_important_layers(probe, batches, progress=progress)
    stages = (result.stage1, result.stage2)
    mask = {
        "selection": result.selection.to_json(),
        "seconds": sum(s.seconds for s in stages),
        "tokens": sum(s.tokens for s in stages),
    }
    return result, mask


def train_briefly(
    model: torch.nn.Module,
    batches,
    steps: int,
    lr: float,
    params: list[torch.nn.Parameter] | None = None,
    sampler: LayerSampler | None = None,
) -> tuple[list[float], float]:
    """`steps` AdamW steps on `params` (default: `model`'s trainable parameters, or a layerwise `sampler`'s groups,
    its active set drawn as `finetune` draws it): the seconds of each step but the first (which allocates the
    optimizer's state), and the peak resident memory's rise (MB) over the start, measured as `finetune` measures
    it."""
    if params is None:
        params = sampler.parameters() if sampler else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    on_step = None
    if sampler is not None:
        sampler.train_only_groups(model)
        on_step = sampler.hook(optimizer)
    start = reset_peak_memory()
    stats = train_steps(model, cycle(batches), optimizer, steps, on_step=on_step, progress=False)
    return stats.step_seconds[1:], peak_memory_mb(start).get("rss_rise_mb", 0.0)


class AnonymousPeak:
    """The peak of the process's anonymous resident memory (MiB; Linux `RssAnon`, sampled every `every` seconds)
    while the block runs. Unlike the kernel's peak RSS it leaves out pages of memory-mapped files, such as a
    safetensors checkpoint that loading or quantizing read, which the OS can drop and reread."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.start_mb, self.peak_mb = every, 0.0, 0.0
        self.done = threading.Event()

    def __enter__(self) -> AnonymousPeak:
        self.start_mb = self.peak_mb = status_mb("RssAnon") or 0.0
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(self.every):
            self.peak_mb = max(self.peak_mb, status_mb("RssAnon") or 0.0)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak_mb = max(self.peak_mb, status_mb("RssAnon") or 0.0)
