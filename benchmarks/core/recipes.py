"""What several studies compute the same way: ILA's mask with the library's defaults and the process's memory while a
block runs. Brief training for step time and memory is the library's (`peft_ila.app.executor.train_briefly`, which
`peft-ila versus` times with too) and the side-by-side timing of several trainings, re-exported."""

from __future__ import annotations

import threading

import torch
from peft import get_peft_model

from peft_ila import ILAConfig, ILAResult, identify_important_layers
from peft_ila.app.executor import side_by_side, train_briefly
from peft_ila.app.files import status_mb

__all__ = ["AnonymousPeak", "default_identification", "default_probe", "side_by_side", "train_briefly"]


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
