"""Run directories of `peft-ila identify`: importance.json, mask.safetensors, heatmap.png, report.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

from .. import __version__
from ..identification.importance import ILAResult
from ..tuner.selection import CERTAIN, Selection
from . import UsageError
from .files import read_json, write_json

IMPORTANCE = "importance.json"
MASK = "mask.safetensors"


def versions() -> dict[str, str]:
    return {
        "peft-ila": __version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine() -> dict:
    """What the numbers were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        **versions(),
    }


def write_run(out: Path | None, result: ILAResult, config: dict, info: dict, command: str) -> dict:
    """Write the four files of a run directory into `out` (an empty staging directory; None writes nothing, as on
    ranks other than 0) and return the record: the selection's JSON form (`Selection.to_json`) and the run's
    settings, data, update norms, costs and losses."""
    record = {
        "command": command,
        **info,
        "config": config,
        **result.selection.to_json(),
        "update_norms": result.update_norms,
        "costs": {
            "stage1": {
                "steps": result.stage1.steps,
                "micro_batches": result.stage1.micro_batches,
                "tokens": result.stage1.tokens,
                "seconds": round(result.stage1.seconds, 2),
                "stop": result.stage1.stop_reason,
            },
            "stage2": {
                "steps": result.stage2.steps,
                "tokens": result.stage2.tokens,
                "seconds": round(result.stage2.seconds, 2),
            },
        },
        "losses": {"stage1": result.stage1.losses, "stage2": result.stage2.losses},
        "versions": versions(),
    }
    if out is None:
        return record
    write_json(out / IMPORTANCE, record)
    meta = {"granularity": config["granularity"], "model": str(info.get("model"))}
    meta["architecture_sha256"] = str(info.get("base_model", {}).get("architecture_sha256"))
    save_file(result.selection.to_tensors(), out / MASK, metadata=meta)
    from .plots import heatmap  # matplotlib (the app extra) only where a plot is drawn

    title = f"ILA layer importance: {Path(str(info.get('model'))).name} on {Path(str(info.get('data'))).name}"
    heatmap(out / "heatmap.png", result.scores, result.selected, title, dict(result.selection.confidence))
    (out / "report.md").write_text(markdown(record))
    return record


def markdown(record: dict) -> str:
    """report.md: the top-k table, the costs, and the command that made it."""
    s1, s2 = record["costs"]["stage1"], record["costs"]["stage2"]
    lines = [
        "# ILA layer importance",
        "",
        f"Model `{record.get('model')}`, data `{record.get('data')}` ({record.get('train_examples')} training "
        f"examples, max length {record['config'].get('max_length', record.get('max_length'))}), "
        f"{len(record['candidates'])} candidate layers, top {len(record['selected'])} kept.",
        "",
        "![heatmap](heatmap.png)",
        "",
        *([confidence_line(record), ""] if record.get("confidence") else []),
        f"| rank | layer | score ({record['config'].get('estimator', 'gates')}) | confidence | update norm ‖ΔW‖ |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {i} | `{name}` | {record['scores'][name]:.4f} | {_percent(record.get('confidence', {}).get(name))} | "
            f"{record['update_norms'][name]:.4f} |"
            for i, name in enumerate(record["selected"], 1)
        ),
        "",
        "## Cost of identification",
        "",
        "| stage | steps | tokens | seconds | ended by |",
        "|---|---:|---:|---:|---|",
        f"| 1: adapters until epsilon-stable | {s1['steps']} | {s1['tokens']} | {s1['seconds']} | {s1['stop']} |",
        f"| 2: {record['config'].get('estimator', 'gates')} | {s2['steps']} | {s2['tokens']} | {s2['seconds']} | "
        "step budget |",
        "",
        "## Command",
        "",
        f"```\n{record['command']}\n```",
        "",
    ]
    return "\n".join(lines)


def confidence_line(record: dict, level: float = CERTAIN) -> str:
    """One line on how sure the selection is, e.g. "top-25% set: 48 of 53 layers certain at 90% ..."."""
    confidence, selected = record.get("confidence") or {}, record["selected"]
    if not confidence:
        return f"confidence: not available for the {record['config'].get('estimator')} estimator (it has no steps)"
    certain = sum(confidence[name] >= level for name in selected)
    chosen = set(selected)
    doubtful = sum(confidence[name] < level for name in record["candidates"] if name not in chosen)
    share = f"top-{len(selected) / len(record['candidates']):.0%}"
    return (
        f"{share} set: {certain} of {len(selected)} layers certain at {level:.0%}; {doubtful} unselected layers "
        f"below {level:.0%} (bootstrap of the {record['costs']['stage2']['steps']} stage-2 steps)"
    )


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def run_model(record: dict) -> dict:
    """The base model a run or adapter record names: its `base_model` identity, or for older records (written before
    model fingerprints) the model spec only."""
    return record.get("base_model") or {"model": record.get("model")}


def inline_run(out: Path) -> Path:
    """The run directory `train --out OUT` writes when it identifies inline: OUT-identify beside it."""
    return out.with_name(out.name + "-identify")


def read_run(run: Path) -> tuple[dict, Selection]:
    """A run directory's record and its selection, checked against its mask.safetensors."""
    run = Path(run)
    if not run.is_dir():
        raise UsageError(f"{run} is not a directory; pass a run directory written by `peft-ila identify`.")
    inline = inline_run(run)
    wanted = "a run directory of `peft-ila identify`" + (
        f" (its inline identification's is {inline})" if inline.is_dir() else ""
    )
    record = read_json(run / IMPORTANCE, wanted)
    if not (run / MASK).is_file():
        raise UsageError(f"{run / MASK} is missing; the run directory is incomplete, run identify again.")
    try:
        selection = Selection.from_json(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{run / IMPORTANCE} holds no valid selection ({exc}); run identify again.") from None
    try:
        differences = selection.differences(Selection.from_tensors(load_file(run / MASK)))
    except Exception as exc:
        raise UsageError(f"{run / MASK} cannot be read ({str(exc).splitlines()[0]}); run identify again.") from None
    if differences:
        raise UsageError(
            f"{run / MASK} and {run / IMPORTANCE} disagree on the {' and the '.join(differences)}; they come from "
            "different runs."
        )
    return record, selection
