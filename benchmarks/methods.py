"""The paper's table for other fine-tuning methods: each of LoRA, DoRA, AdaLoRA, QLoRA and full fine-tuning on all
candidate layers, on ILA's top 25% and on its top 75% (one mask, found once with the library defaults).

    python -m benchmarks.methods --preset full    # `make bench-methods`; resumable: a finished cell is kept
    python -m benchmarks.methods --preset quick   # smoke-sized, on whatever --model is given

Cells (`benchmarks/results/methods/<preset>/`): `mask-*` (identification on the primary dataset: the selection and
its cost), `tune-*` (one method at one learning rate on one share of the layers: held-out loss before and after,
median seconds per step, peak memory rise, trainable parameters, optimizer-state bytes) and `identify-*` (the
identification again on the base unquantized or in 4 bits: its weights' bytes, memory, step time and selection).
Writes `methods.json` and `METHODS.md` (tables and findings). The study stands on `benchmarks/core`.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model

from benchmarks.core.cells import Study
from benchmarks.core.inputs import Inputs
from benchmarks.core.page import Column, Finding, columns, findings_section, missing_section, number
from benchmarks.core.recipes import AnonymousPeak, default_identification, default_probe
from benchmarks.core.stats import expected_random_jaccard, jaccard
from peft_ila import Selection, resolve_top_k, train_only_selected
from peft_ila.app.files import peak_memory_mb, reset_peak_memory
from peft_ila.app.judge import ratio
from peft_ila.app.pipeline import finetune, method_config

PRESETS = {
    "quick": dict(max_length=64, batch_size=2, eval_size=8, steps=3, stage1=4, stage2=2),
    "full": dict(max_length=128, batch_size=4, eval_size=32, steps=30, stage1=128, stage2=32),
}
METHODS = ("lora", "dora", "adalora", "qlora", "full")
SHARES = {"all": None, "ILA top 25%": 0.25, "ILA top 75%": 0.75}  # share name -> top-k fraction of the mask
# AdamW learning rates of each method (default 1e-3: adapters). AdaLoRA's update starts at E = 0 between small
# random A and B, so at 30 steps it barely moves at the adapters' rate: it gets a row at 10x as well.
ADAPTER_LR = 1e-3  # every adapter method's learning rate
LEARNING_RATES = {"full": (5e-5,), "adalora": (ADAPTER_LR, 1e-2)}  # the exceptions: method -> its rates
ADAPTER = dict(r=8, lora_alpha=16)
QUANTIZE = {None: "unquantized", "4bit": "4-bit (NF4)"}  # identification's base -> its name on the page
LEARNS = 0.01  # nats: an all-layers fine-tune that lowers the held-out loss by less is too short to compare shares
MB = 2**20  # bytes


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's state (parameters, buffers, quantization states), a tensor tied to another counted once (a
    4-bit weight: packed)."""
    return sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())


def picked(record: dict, *keys: str) -> dict:
    """`record`'s entries of `keys`, in that order."""
    return {k: record[k] for k in keys}


class Methods(Study):
    """The cells of one preset on the primary dataset."""

    name, page_name, target, presets = "methods", "METHODS.md", "make bench-methods", PRESETS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.data = Inputs(args, self.p)
        self.dataset = self.data.primary

    @classmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS), help="comma-separated")

    def settings(self) -> dict:
        """What the mask depends on: the data, the identification budget, the adapters' shape."""
        return {**self.data.identity(self.dataset), "stage1": self.p["stage1"], "stage2": self.p["stage2"], **ADAPTER}

    def identify(self, quantize: str | None) -> dict:
        """Identification with the library's defaults (its budget from the preset) on the base loaded as `quantize`
        says: the selection, its seconds and tokens, and the resident memory before and at its peak (MiB)."""
        prepared = self.data.load(self.dataset, quantize)
        weights_mb = tensor_bytes(prepared.model) / MB
        start_mb = reset_peak_memory()
        probe = default_probe(prepared.model, self.p["stage1"], self.p["stage2"], ADAPTER)
        batches = prepared.batches(self.p["batch_size"], 0)
        with AnonymousPeak() as anonymous:
            result, mask = default_identification(probe, batches, self.args.progress)
        memory = {"start_mb": start_mb, **peak_memory_mb(start_mb), "weights_mb": weights_mb}
        return {
            **mask,
            "median_step_seconds": statistics.median(result.stage1.step_seconds),
            "memory": memory | {"anonymous_start_mb": anonymous.start_mb, "anonymous_peak_mb": anonymous.peak_mb},
        }

    def mask(self) -> dict:
        """The mask every method is put on: identification on the unquantized base (selection and cost)."""
        return self.cell(
            "mask", self.settings(), lambda stem: picked(self.identify(None), "selection", "seconds", "tokens")
        )

    def identification(self, quantize: str | None) -> dict:
        """Identification again, on the base unquantized or in 4 bits, with its memory: what QLoRA-style
        identification saves, and whether it finds the same layers."""
        return self.cell("identify", {**self.settings(), "quantize": quantize}, lambda stem: self.identify(quantize))

    def tune(self, method: str, lr: float, share: str, mask: dict) -> dict:
        """`method` at learning rate `lr` on a share of the layers of `mask`: a fine-tune of the preset's steps, and
        what it cost."""
        steps = self.p["steps"]
        settings = {**self.data.identity(self.dataset), "method": method, "share": share, "steps": steps}
        settings.update(**ADAPTER, mask=mask["settings"], lr=lr)

        def compute(stem: Path) -> dict:
            found, k = Selection.from_json(mask["selection"]), SHARES[share]
            chosen = found.top(resolve_top_k(k, len(found.candidates))) if k else Selection.everything(found.candidates)
            prepared = self.data.load(self.dataset, "4bit" if method == "qlora" else None)
            model, params = prepared.model, None
            if method == "full":
                params = train_only_selected(model, chosen)
            else:
                model = get_peft_model(model, method_config(method, chosen, **ADAPTER, lora_dropout=0.0, steps=steps))
            shape = dict(batch_size=self.p["batch_size"], seed=0, warmup=0.1, progress=self.args.progress)
            report = finetune(model, prepared, steps, lr, **shape, params=params)
            # AdamW keeps two float32 tensors (exp_avg, exp_avg_sq) the size of every trainable parameter
            costs = {"layers": len(chosen.selected), "optimizer_state_bytes": 8 * report.trainable_params}
            return asdict(report) | costs

        return self.cell("tune", settings, compute)

    def run(self) -> dict:
        mask = self.collect("the mask", self.mask)
        if mask is None:
            return {"rows": []}
        selection = Selection.from_json(mask["selection"])
        cost = picked(mask, "seconds", "tokens") | {"candidates": len(selection.candidates)}
        results: dict = {"rows": [], "identification": cost, "identifications": []}
        for method, lr, share in ((m, lr, s) for m in self.args.methods for lr in rates(m) for s in SHARES):
            tuned = self.collect(f"{method} at lr {lr:g} on {share}", self.tune, method, lr, share, mask)
            if tuned is not None:
                row = {"method": method, "lr": lr, "share": share}
                results["rows"].append(row | {k: v for k, v in tuned.items() if k != "losses"})
        for quantize, base in QUANTIZE.items():
            found = self.collect(f"identification on the {base} base", self.identification, quantize)
            if found is not None:
                top = set(Selection.from_json(found["selection"]).selected)
                results["identifications"].append(
                    {"base": base, "jaccard_with_mask": jaccard(top, set(selection.selected))}
                    | picked(found, "seconds", "tokens", "median_step_seconds", "memory")
                )
        return results

    def findings(self, results: dict) -> list[Finding]:
        """The page's answers, derived from the cells there are; these are reports of one seed of a short fine-tune,
        so most state what was measured and judge nothing."""
        rows = {(r["method"], r["lr"], r["share"]): r for r in results["rows"]}
        runs = [run for run in dict.fromkeys((m, lr) for m, lr, _ in rows) if (*run, "all") in rows]  # grid order
        judged = [run for run in runs if gain(rows[*run, "all"]) >= LEARNS]
        lora = rows.get(("lora", ADAPTER_LR, "all"))
        shares = [finding for share in SHARES if SHARES[share] for finding in share_finding(rows, judged, share)]
        stalled = learns_finding(rows, [run for run in runs if run not in judged], self.p["steps"])
        return shares + stalled + optimizer_finding(rows, lora) + identification_findings(results, lora)

    def page(self, results: dict) -> str:
        p, preset, machine = self.p, results["preset"], results["machine"]
        seconds = results.get("identification", {}).get("seconds")
        found = [Finding(**f) for f in results.get("findings", [])]
        lines = [
            "# Fine-tuning methods on an ILA selection",
            "",
            f"Written by `python -m benchmarks.methods --preset {preset}` (`make bench-methods`) from the cells in "
            f"`benchmarks/results/methods/{preset}`; {machine['cpu_count']} CPU cores, torch {machine['torch']}. "
            f"Each row: {p['steps']} AdamW steps of batch {p['batch_size']} at max length {p['max_length']}, held-out "
            f"loss on {p['eval_size']} examples. One mask, found once with the library's defaults ({p['stage1']} + "
            f"{p['stage2']} steps" + (f", {seconds:.0f} s)." if seconds else ")."),
            "Optimizer state: AdamW's two float32 tensors per trainable parameter. Memory: the peak rise of the "
            "process's resident memory during the fine-tune (CPU).",
            "",
            *columns(TUNE_COLUMNS, results["rows"]),
            *(identification_section(results["identifications"]) if results.get("identifications") else []),
            "",
            *(findings_section(found) if found else []),
            *missing_section(results["missing"], self.target),
        ]
        return "\n".join(lines).rstrip("\n") + "\n"


def gain(row: dict) -> float:
    """How much a fine-tune lowered the held-out loss."""
    return row["loss_before"] - row["loss_after"]


def own_peak_mb(row: dict) -> float:
    """What identification itself took above the loaded model: the rise of anonymous memory (MiB)."""
    return row["memory"]["anonymous_peak_mb"] - row["memory"]["anonymous_start_mb"]


def needs_mb(row: dict) -> float:
    """What identification needs in all: the loaded model's weights and its own peak (MiB)."""
    return row["memory"]["weights_mb"] + own_peak_mb(row)


def rates(method: str) -> tuple[float, ...]:
    """The AdamW learning rates `method` runs at (one row each)."""
    return LEARNING_RATES.get(method, (ADAPTER_LR,))


def label(method: str, lr: float) -> str:
    """A method's name, with its learning rate where it has more than one row."""
    return method if len(rates(method)) == 1 else f"{method} at lr {lr:g}"


def share_finding(rows: dict, judged: list[tuple[str, float]], share: str) -> list[Finding]:
    """How much of the all-layers loss gain each method keeps on `share`, at what step time and memory."""
    kept = {run: gain(rows[*run, share]) / gain(rows[*run, "all"]) for run in judged if (*run, share) in rows}
    if not kept:
        return []
    parts = []
    for run, part in kept.items():
        row, every = rows[*run, share], rows[*run, "all"]
        time = ratio(row["median_step_seconds"], every["median_step_seconds"])
        memory = ratio(row["memory"]["rss_rise_mb"], every["memory"]["rss_rise_mb"])
        parts.append(f"{label(*run)} {part:.0%} at {number(time)}x, {number(memory)}x")
    verdict = f"keeps {min(kept.values()):.0%} to {max(kept.values()):.0%} of the all-layers loss gain"
    evidence = f"share of the gain kept, at that step time and peak memory rise (x all layers): {'; '.join(parts)}"
    name = share.lower().replace(" ", "-").replace("%", "")  # "ILA top 25%" -> "ila-top-25"
    return [Finding(f"{share} against all layers", verdict, evidence, id=f"methods-{name}")]


def learns_finding(rows: dict, stalled: list[tuple[str, float]], steps: int) -> list[Finding]:
    """The methods whose all-layers fine-tune did not learn in `steps` steps (their shares are not compared)."""
    if not stalled:
        return []
    said = ", ".join(f"{label(*run)} ({gain(rows[*run, 'all']):.4f})" for run in stalled)
    return [
        Finding(
            f"Every method learns in {steps} steps",
            f"not {', '.join(label(*run) for run in stalled)}",
            f"held-out loss lowered on all layers by {said}",
            f"a method learns when it lowers the held-out loss by at least {LEARNS} on all layers; the shares of one "
            "that does not are not compared",
            id="methods-learns",
        )
    ]


def optimizer_finding(rows: dict, lora: dict | None) -> list[Finding]:
    """How much smaller full fine-tuning's optimizer state is on ILA's top 25%, against LoRA's on all layers."""
    mb = {run[2]: row["optimizer_state_bytes"] / MB for run, row in rows.items() if run[0] == "full"}
    if not ("all" in mb and "ILA top 25%" in mb and lora):
        return []
    return [
        Finding(
            "A selection shrinks full fine-tuning's optimizer state",
            f"{mb['ILA top 25%'] / mb['all']:.2f}x on ILA's top 25%",
            f"{mb['all']:.0f} MB on all layers, {mb['ILA top 25%']:.0f} MB on ILA's top 25%, against "
            f"{lora['optimizer_state_bytes'] / MB:.1f} MB for LoRA on all layers",
            id="methods-optimizer-state",
        )
    ]


def identification_findings(results: dict, lora: dict | None) -> list[Finding]:
    """Identification's cost in LoRA steps, and what identifying on a 4-bit base saves and changes."""
    found = {row["base"]: row for row in results.get("identifications", [])}
    plain, small = found.get(QUANTIZE[None]), found.get(QUANTIZE["4bit"])
    if not (plain and small and lora):
        return []
    candidates, mask_seconds = results["identification"]["candidates"], results["identification"]["seconds"]
    random = expected_random_jaccard(candidates, resolve_top_k(0.25, candidates))
    weights = [row["memory"]["weights_mb"] for row in (small, plain)]
    step = [row["median_step_seconds"] for row in (small, plain)]
    return [
        Finding(
            "Identification's cost",
            f"as long as {mask_seconds / lora['median_step_seconds']:.0f} steps of LoRA on all layers",
            f"the mask took {mask_seconds:.0f} s",
            id="methods-identification-cost",
        ),
        Finding(
            "Identification on a 4-bit base",
            f"{number(ratio(needs_mb(small), needs_mb(plain)))}x the memory, top-25% Jaccard "
            f"{small['jaccard_with_mask']:.2f} with the unquantized mask",
            f"weights {weights[0]:.0f} MB against {weights[1]:.0f} MB; weights and identification's own peak "
            f"{needs_mb(small):.0f} MB against {needs_mb(plain):.0f} MB; {step[0]:.2f} s per stage-1 step against "
            f"{step[1]:.2f} s ({number(ratio(*step))}x); two random top-25% sets overlap at {random:.2f}",
            id="methods-4bit",
        ),
    ]


TUNE_COLUMNS: list[Column] = [  # each fine-tune: its held-out loss before and after, its speed and its memory
    ("method", "l", lambda row: row["method"]),
    ("lr", "r", lambda row: f"{row['lr']:g}"),
    ("layers", "l", lambda row: f"{row['share']} ({row['layers']})"),
    ("held-out loss before -> after", "l", lambda row: f"{row['loss_before']:.4f} -> {row['loss_after']:.4f}"),
    ("s/step", "r", lambda row: f"{row['median_step_seconds']:.2f}"),
    ("peak memory rise (MB)", "r", lambda row: f"{row['memory']['rss_rise_mb']:.0f}"),
    ("trainable params", "r", lambda row: f"{row['trainable_params']:,}"),
    ("optimizer state (MB)", "r", lambda row: f"{row['optimizer_state_bytes'] / MB:.1f}"),
]
IDENTIFICATION_COLUMNS: list[Column] = [  # identification on each base: cost, memory, agreement with the mask
    ("base", "l", lambda row: row["base"]),
    ("seconds", "r", lambda row: f"{row['seconds']:.0f}"),
    ("s/stage-1 step", "r", lambda row: f"{row['median_step_seconds']:.2f}"),
    ("weights (MB)", "r", lambda row: f"{row['memory']['weights_mb']:.0f}"),
    ("own peak (MB)", "r", lambda row: f"{own_peak_mb(row):.0f}"),
    ("weights + own peak (MB)", "r", lambda row: f"{needs_mb(row):.0f}"),
    ("peak RSS (MB)", "r", lambda row: f"{row['memory']['peak_rss_mb']:.0f}"),
    ("top-25% Jaccard with the mask", "r", lambda row: f"{row['jaccard_with_mask']:.2f}"),
]


def identification_section(rows: list[dict]) -> list[str]:
    """Identification itself on each base: cost, memory, and agreement of its top 25% with the mask's."""
    return [
        "",
        "## Identification on a quantized base",
        "",
        "The same identification (same budget, data and seed) on the base loaded unquantized and in 4 bits. Weights: "
        "the bytes of the loaded model's state. Own peak: the rise of the process's anonymous memory (RssAnon, "
        "sampled every 20 ms) during identification: adapters, gates, activations, gradients, optimizer state and "
        "any dequantized copies. Peak RSS (the kernel's) is shown too, but it does not compare the two: unquantized "
        "weights stay in the memory-mapped safetensors checkpoint and count only once read, while quantizing reads "
        "the whole checkpoint, whose pages stay counted until the OS needs them. Agreement: top-25% Jaccard with the "
        "mask above (1.0: the same layers). Seconds are wall time on a shared machine; the median seconds per "
        "stage-1 step is the fairer comparison.",
        "",
        *columns(IDENTIFICATION_COLUMNS, rows),
    ]


if __name__ == "__main__":
    Methods.main()
