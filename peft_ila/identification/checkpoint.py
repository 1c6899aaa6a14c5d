"""Checkpoints of an identification run or a fine-tune, so that an interrupted run continues where it stopped.

One safetensors file holds a run's state: its tensors (trainable weights by name, gate logits, optimizer state,
random-number-generator states) and, in the file's metadata, a JSON record (stage, step statistics, data
position, settings). It is written under a temporary name and then renamed, so a crash while saving leaves the
previous checkpoint whole. Nothing in it is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..tuner.atomic import written_atomically
from ..tuner.selection import ILALoadError
from .distributed import any_rank, gather, rank

FORMAT = "peft-ila identification checkpoint v1"
FINETUNE_FORMAT = "peft-ila fine-tune checkpoint v1"


def save_checkpoint(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], record: dict, kind: str = FORMAT
) -> None:
    """Write `tensors` and the JSON-able `record` to `path` atomically, as a checkpoint of format `kind`."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with written_atomically(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "ila": json.dumps({"format": kind, **record})})


def checkpoint_record(path: str | os.PathLike) -> dict | None:
    """The JSON record of a peft-ila checkpoint (its "format" included), read without its tensors; None if `path`
    is not one (missing, unreadable, or another file)."""
    try:
        with safe_open(path, framework="pt") as f:
            record = json.loads((f.metadata() or {}).get("ila", "{}"))
    except Exception:
        return None
    return record if str(record.get("format", "")).startswith("peft-ila ") else None


def load_checkpoint(path: str | os.PathLike, kind: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and record of a checkpoint of format `kind`; `ILALoadError` naming the file if it is missing,
    damaged or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise ILALoadError(f"No checkpoint at {path}; start without resuming.")
    try:
        with safe_open(path, framework="pt") as f:
            record = json.loads((f.metadata() or {}).get("ila", "{}"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise ILALoadError(
            f"{path} cannot be read ({str(exc).splitlines()[0]}); it is damaged, start without resuming."
        ) from None
    if record.get("format") != kind:
        raise ILALoadError(f"{path} is not a {kind} (it says {record.get('format')!r}); start without resuming.")
    return tensors, record


def load_checked(path: str | os.PathLike, settings: dict, kind: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint of format `kind` to resume from, once every rank has reached this point (so the rank that
    writes checkpoints has finished its last one), refused if it was written with other `settings`."""
    gather(None)
    tensors, record = load_checkpoint(path, kind)
    check_settings(Path(path), record["settings"], settings)
    return tensors, record


def parameter_tensors(named: dict[str, torch.Tensor], prefix: str = "param") -> dict[str, torch.Tensor]:
    """Trainable parameters (or other tensors) by name, as a checkpoint holds them (`{prefix}.{name}`)."""
    return {f"{prefix}.{name}": p for name, p in named.items()}


@torch.no_grad()
def restore_parameters(
    named: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path, prefix: str = "param"
) -> None:
    """Copy a checkpoint's `parameter_tensors(named, prefix)` back into `named`; `ILALoadError` if it lacks any."""
    missing = sorted(n for n in named if f"{prefix}.{n}" not in tensors)
    if missing:
        raise ILALoadError(f"{path} holds no weights for {missing[:3]}; it was written for another model or adapter.")
    for name, p in named.items():
        p.copy_(tensors[f"{prefix}.{name}"])


def check_settings(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a run made with other settings, naming the ones that differ."""
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in differing[:3])
        raise ILALoadError(
            f"{path} was written by a run with other settings ({shown}); resume with the same settings, or start "
            "over without resuming."
        )


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's state as tensors `{prefix}.{param index}.{key}`, and its param groups (JSON-able)."""
    state = optimizer.state_dict()
    tensors = {
        f"{prefix}.{i}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for i, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, groups: list):
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(devices: list[int]) -> dict[str, torch.Tensor]:
    """The CPU generator's state and that of each CUDA device in `devices` (what dropout draws from)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    tensors.update({f"rng.cuda.{d}": torch.cuda.get_rng_state(d) for d in devices})
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], devices: list[int]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    for d in devices:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{d}"], d)


class DataPosition:
    """A batch stream that counts and fingerprints (SHA-256 of every tensor) the micro-batches taken from it, so a
    resumed run can skip exactly those and check that they are the same data."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        self._batches = iter(batches)
        self.count = 0
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self._batches:
            self.count += 1
            for key in sorted(batch):
                if torch.is_tensor(batch[key]):
                    self._digest.update(key.encode())
                    self._digest.update(_bytes(batch[key].detach()))
            yield batch

    def record(self) -> dict:
        """The position on every rank (a collective under several processes)."""
        return {"micro_batches": self.count, "digests": gather(self._digest.hexdigest())}

    def skip_to(self, saved: dict, path: Path) -> None:
        """Consume the micro-batches a checkpointed run had consumed; refuse (on every rank) if they differ."""
        for _ in zip(range(saved["micro_batches"]), self, strict=False):
            pass
        digests = saved["digests"]
        differs = self.count != saved["micro_batches"] or rank() >= len(digests)
        differs = differs or self._digest.hexdigest() != digests[rank()]
        if any_rank(differs):
            raise ILALoadError(
                f"The data differ from those of the run that wrote {path}: its first {saved['micro_batches']} "
                "micro-batches are not the same here. Resume with the same data, batch size, seed and processes, or "
                "start over without resuming."
            )
