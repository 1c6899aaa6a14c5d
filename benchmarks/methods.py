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
from benchmarks.core.page import Finding, findings_section, missing_section, table
from benchmarks.core.recipes import AnonymousPeak, default_identification, default_probe
from benchmarks.core.stats import expected_random_jaccard, jaccard
from peft_ila import Selection, resolve_top_k, train_only_selected
from peft_ila.app.files import peak_memory_mb, reset_peak_memory
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


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's state (parameters, buffers, quantization states), a tensor tied to another counted once (a
    4-bit weight: packed)."""
    return sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())


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
        weights_mb = tensor_bytes(prepared.model) / 2**20
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

        def compute(stem: Path) -> dict:
            found = self.identify(None)
            return {k: found[k] for k in ("selection", "seconds", "tokens")}

        return self.cell("mask", self.settings(), compute)

    def identification(self, quantize: str | None) -> dict:
        """Identification again, on the base unquantized or in 4 bits, with its memory: what QLoRA-style
        identification saves, and whether it finds the same layers."""
        settings = {**self.settings(), "quantize": quantize}
        return self.cell("identify", settings, lambda stem: self.identify(quantize))

    def tune(self, method: str, lr: float, share: str, mask: dict) -> dict:
        """`method` at learning rate `lr` on a share of the layers of `mask`: a fine-tune of the preset's steps, and
        what it cost."""
        settings = {**self.data.identity(self.dataset), "method": method, "share": share, "steps": self.p["steps"]}
        settings.update(**ADAPTER, mask=mask["settings"], lr=lr)

        def compute(stem: Path) -> dict:
            found = Selection.from_json(mask["selection"])
            k = SHARES[share]
            chosen = found.top(resolve_top_k(k, len(found.candidates))) if k else Selection.everything(found.candidates)
            prepared = self.data.load(self.dataset, "4bit" if method == "qlora" else None)
            model, params = prepared.model, None
            if method == "full":
                params = train_only_selected(model, chosen)
            else:
                config = method_config(method, chosen, **ADAPTER, lora_dropout=0.0, steps=self.p["steps"])
                model = get_peft_model(model, config)
            batch_size, steps = self.p["batch_size"], self.p["steps"]
            report = finetune(
                model, prepared, steps, lr, batch_size, 0, 0.1, progress=self.args.progress, params=params
            )
            # AdamW keeps two float32 tensors (exp_avg, exp_avg_sq) the size of every trainable parameter
            return {
                **asdict(report),
                "layers": len(chosen.selected),
                "optimizer_state_bytes": 8 * report.trainable_params,
            }

        return self.cell("tune", settings, compute)

    def run(self) -> dict:
        results: dict = {"rows": []}
        mask = self.collect("the mask", self.mask)
        if mask is None:
            return results
        candidates = len(Selection.from_json(mask["selection"]).candidates)
        results["identification"] = {"seconds": mask["seconds"], "tokens": mask["tokens"], "candidates": candidates}
        runs = [(m, lr, s) for m in self.args.methods for lr in rates(m) for s in SHARES]
        for method, lr, share in runs:
            tuned = self.collect(f"{method} at lr {lr:g} on {share}", self.tune, method, lr, share, mask)
            if tuned is not None:
                row = {"method": method, "lr": lr, "share": share}
                results["rows"].append(row | {k: v for k, v in tuned.items() if k != "losses"})
        mask_top = set(Selection.from_json(mask["selection"]).selected)
        results["identifications"] = []
        for quantize, base in QUANTIZE.items():
            found = self.collect(f"identification on the {base} base", self.identification, quantize)
            if found is not None:
                top = set(Selection.from_json(found["selection"]).selected)
                results["identifications"].append(
                    {"base": base, "jaccard_with_mask": jaccard(top, mask_top)}
                    | {k: found[k] for k in ("seconds", "tokens", "median_step_seconds", "memory")}
                )
        return results

    def findings(self, results: dict) -> list[Finding]:
        return findings(results, self.p["steps"])

    def page(self, results: dict) -> str:
        p = self.p
        seconds = results.get("identification", {}).get("seconds")
        lines = [
            "# Fine-tuning methods on an ILA selection",
            "",
            f"Written by `python -m benchmarks.methods --preset {results['preset']}` (`make bench-methods`) from the "
            f"cells in `benchmarks/results/methods/{results['preset']}`; {results['machine']['cpu_count']} CPU cores, "
            f"torch {results['machine']['torch']}. Each row: {p['steps']} AdamW steps of batch {p['batch_size']} at "
            f"max length {p['max_length']}, held-out loss on {p['eval_size']} examples. One mask, found once with the "
            f"library's defaults ({p['stage1']} + {p['stage2']} steps" + (f", {seconds:.0f} s)." if seconds else ")."),
            "Optimizer state: AdamW's two float32 tensors per trainable parameter. Memory: the peak rise of the "
            "process's resident memory during the fine-tune (CPU).",
            "",
            *tune_table(results["rows"]),
        ]
        if results.get("identifications"):
            lines += identification_table(results["identifications"])
        found = [Finding(**f) for f in results.get("findings", [])]
        lines += ["", *(findings_section(found) if found else []), *missing_section(results["missing"], self.target)]
        return "\n".join(lines).rstrip("\n") + "\n"


def gain(row: dict) -> float:
    """How much a fine-tune lowered the held-out loss."""
    return row["loss_before"] - row["loss_after"]


def findings(results: dict, steps: int) -> list[Finding]:
    """The page's answers, derived from the cells there are; these are reports of one seed of a short fine-tune,
    so most state what was measured and judge nothing."""
    rows = {(r["method"], r["lr"], r["share"]): r for r in results["rows"]}
    runs = list(dict.fromkeys((m, lr) for m, lr, _ in rows))  # grid order
    judged = [run for run in runs if (*run, "all") in rows and gain(rows[*run, "all"]) >= LEARNS]
    stalled = [run for run in runs if (*run, "all") in rows and run not in judged]
    out = [share_finding(rows, judged, share) for share in SHARES if SHARES[share]]
    out = [f for f in out if f is not None]
    if stalled:
        said = ", ".join(f"{label(*run)} ({gain(rows[*run, 'all']):.4f})" for run in stalled)
        out.append(
            Finding(
                f"Every method learns in {steps} steps",
                f"not {', '.join(label(*run) for run in stalled)}",
                f"held-out loss lowered on all layers by {said}",
                f"a method learns when it lowers the held-out loss by at least {LEARNS} on all layers; the shares of "
                "one that does not are not compared",
                id="methods-learns",
            )
        )
    lora = rows.get(("lora", ADAPTER_LR, "all"))
    out += optimizer_finding(rows, lora) + identification_findings(results, lora)
    return out


def share_finding(rows: dict, judged: list[tuple[str, float]], share: str) -> Finding | None:
    """How much of the all-layers loss gain each method keeps on `share`, at what step time and memory."""
    kept = {run: gain(rows[*run, share]) / gain(rows[*run, "all"]) for run in judged if (*run, share) in rows}
    if not kept:
        return None
    parts = []
    for run in kept:
        row, every = rows[*run, share], rows[*run, "all"]
        time = row["median_step_seconds"] / every["median_step_seconds"]
        memory = row["memory"]["rss_rise_mb"] / every["memory"]["rss_rise_mb"]
        parts.append(f"{label(*run)} {kept[run]:.0%} at {time:.2f}x, {memory:.2f}x")
    verdict = f"keeps {min(kept.values()):.0%} to {max(kept.values()):.0%} of the all-layers loss gain"
    evidence = f"share of the gain kept, at that step time and peak memory rise (x all layers): {'; '.join(parts)}"
    return Finding(
        f"{share} against all layers",
        verdict,
        evidence,
        id=f"methods-{share.lower().replace(' ', '-').replace('%', '')}",
    )


def optimizer_finding(rows: dict, lora: dict | None) -> list[Finding]:
    full = {run[2]: row for run, row in rows.items() if run[0] == "full"}
    if not ("all" in full and "ILA top 25%" in full and lora):
        return []
    mb = {share: row["optimizer_state_bytes"] / 2**20 for share, row in full.items()}
    return [
        Finding(
            "A selection shrinks full fine-tuning's optimizer state",
            f"{mb['ILA top 25%'] / mb['all']:.2f}x on ILA's top 25%",
            f"{mb['all']:.0f} MB on all layers, {mb['ILA top 25%']:.0f} MB on ILA's top 25%, against "
            f"{lora['optimizer_state_bytes'] / 2**20:.1f} MB for LoRA on all layers",
            id="methods-optimizer-state",
        )
    ]


def identification_findings(results: dict, lora: dict | None) -> list[Finding]:
    found = {row["base"]: row for row in results.get("identifications", [])}
    plain, small = found.get(QUANTIZE[None]), found.get(QUANTIZE["4bit"])
    if not (plain and small and lora):
        return []
    candidates = results["identification"]["candidates"]
    k = resolve_top_k(0.25, candidates)
    weights = {row["base"]: row["memory"]["weights_mb"] for row in (plain, small)}
    need = {row["base"]: weights[row["base"]] + own_peak_mb(row) for row in (plain, small)}
    step = small["median_step_seconds"] / plain["median_step_seconds"]
    mask_seconds = results["identification"]["seconds"]
    return [
        Finding(
            "Identification's cost",
            f"as long as {mask_seconds / lora['median_step_seconds']:.0f} steps of LoRA on all layers",
            f"the mask took {mask_seconds:.0f} s",
            id="methods-identification-cost",
        ),
        Finding(
            "Identification on a 4-bit base",
            f"{need[small['base']] / need[plain['base']]:.2f}x the memory, top-25% Jaccard "
            f"{small['jaccard_with_mask']:.2f} with the unquantized mask",
            f"weights {weights[small['base']]:.0f} MB against {weights[plain['base']]:.0f} MB; weights and "
            f"identification's own peak {need[small['base']]:.0f} MB against {need[plain['base']]:.0f} MB; "
            f"{small['median_step_seconds']:.2f} s per stage-1 step against {plain['median_step_seconds']:.2f} s "
            f"({step:.2f}x); two random top-25% sets overlap at {expected_random_jaccard(candidates, k):.2f}",
            id="methods-4bit",
        ),
    ]


def rates(method: str) -> tuple[float, ...]:
    """The AdamW learning rates `method` runs at (one row each)."""
    return LEARNING_RATES.get(method, (ADAPTER_LR,))


def label(method: str, lr: float) -> str:
    """A method's name, with its learning rate where it has more than one row."""
    return method if len(rates(method)) == 1 else f"{method} at lr {lr:g}"


def tune_table(rows: list[dict]) -> list[str]:
    """Each fine-tune: its held-out loss before and after, its speed and what it holds in memory."""
    header = ["method", "lr", "layers", "held-out loss before -> after", "s/step", "peak memory rise (MB)"]
    header += ["trainable params", "optimizer state (MB)"]
    body = [
        [
            row["method"],
            f"{row['lr']:g}",
            f"{row['share']} ({row['layers']})",
            f"{row['loss_before']:.4f} -> {row['loss_after']:.4f}",
            f"{row['median_step_seconds']:.2f}",
            f"{row['memory']['rss_rise_mb']:.0f}",
            f"{row['trainable_params']:,}",
            f"{row['optimizer_state_bytes'] / 2**20:.1f}",
        ]
        for row in rows
    ]
    return table(header, body, "lrllrrrr")


def identification_table(rows: list[dict]) -> list[str]:
    """Identification itself on each base: cost, memory, and agreement of its top 25% with the mask's."""
    lines = [
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
    ]
    body = []
    for row in rows:
        memory, own = row["memory"], own_peak_mb(row)
        body.append(
            [
                row["base"],
                f"{row['seconds']:.0f}",
                f"{row['median_step_seconds']:.2f}",
                f"{memory['weights_mb']:.0f}",
                f"{own:.0f}",
                f"{memory['weights_mb'] + own:.0f}",
                f"{memory['peak_rss_mb']:.0f}",
                f"{row['jaccard_with_mask']:.2f}",
            ]
        )
    header = ["base", "seconds", "s/stage-1 step", "weights (MB)", "own peak (MB)", "weights + own peak (MB)"]
    header += ["peak RSS (MB)", "top-25% Jaccard with the mask"]
    return [*lines, *table(header, body, "lrrrrrrr")]


def own_peak_mb(row: dict) -> float:
    """What identification itself took above the loaded model: the rise of anonymous memory (MiB)."""
    return row["memory"]["anonymous_peak_mb"] - row["memory"]["anonymous_start_mb"]


if __name__ == "__main__":
    Methods.main()
