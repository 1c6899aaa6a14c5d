"""The paper's table for other fine-tuning methods: each of LoRA, DoRA, AdaLoRA, QLoRA and full fine-tuning on all
candidate layers, on ILA's top 25% and on its top 75% (one mask, found once with the library defaults).

    python benchmarks/methods.py --preset full    # `make bench-methods`; resumable: a finished cell is kept
    python benchmarks/methods.py --preset quick   # smoke-sized, on whatever --model is given

Cells (`benchmarks/results/methods/<preset>/`): `mask-*` (identification on the primary dataset: the selection and
its cost), `tune-*` (one method at one learning rate on one share of the layers: held-out loss before and after,
median seconds per step, peak memory rise, trainable parameters, optimizer-state bytes) and `identify-*` (the
identification again on the base unquantized or in 4 bits: its weights' bytes, memory, step time and selection).
Writes `methods.json` and `METHODS.md` (tables and findings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.cells import Missing, add_cell_options, cell, write_study  # noqa: E402
from benchmarks.run import (  # noqa: E402
    add_inputs,
    data_identity,
    dataset_files,
    default_identification,
    default_probe,
    parsed_inputs,
)
from benchmarks.stability import expected_random_jaccard  # noqa: E402
from peft_ila import Selection, train_only_selected  # noqa: E402
from peft_ila.app.cli import _offline_and_quiet  # noqa: E402
from peft_ila.app.compare import jaccard  # noqa: E402
from peft_ila.app.files import peak_memory_mb, reset_peak_memory  # noqa: E402
from peft_ila.app.pipeline import finetune, method_config, prepare  # noqa: E402
from peft_ila.app.report import machine  # noqa: E402
from peft_ila.tuner.config import resolve_top_k  # noqa: E402

PRESETS = {
    "quick": dict(max_length=64, batch_size=2, eval_size=8, steps=3, stage1=4, stage2=2),
    "full": dict(max_length=128, batch_size=4, eval_size=32, steps=30, stage1=128, stage2=32),
}
METHODS = ("lora", "dora", "adalora", "qlora", "full")
SHARES = {"all": None, "ILA top 25%": 0.25, "ILA top 75%": 0.75}  # share name -> top-k fraction of the mask
# AdamW learning rates of each method (default 1e-3: adapters). AdaLoRA's update starts at E = 0 between small
# random A and B, so at 30 steps it barely moves at the adapters' rate: it gets a row at 10x as well.
LR = {"full": (5e-5,), "adalora": (1e-3, 1e-2)}
ADAPTER = dict(r=8, lora_alpha=16)
QUANTIZE = {None: "unquantized", "4bit": "4-bit (NF4)"}  # identification's base -> its name on the page
LEARNS = 0.01  # nats: an all-layers fine-tune that lowers the held-out loss by less is too short to compare shares


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's state (parameters, buffers, quantization states), a tensor tied to another counted once (a
    4-bit weight: packed)."""
    return sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())


class AnonymousPeak:
    """The peak of the process's anonymous resident memory (MiB; Linux `RssAnon`, sampled every `every` seconds)
    while the block runs. Unlike the kernel's peak RSS it leaves out pages of memory-mapped files, such as a
    safetensors checkpoint that loading or quantizing read, which the OS can drop and reread."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.start_mb, self.peak_mb = every, 0.0, 0.0
        self._done = threading.Event()

    def __enter__(self) -> AnonymousPeak:
        self.start_mb = self.peak_mb = _anonymous_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            self.peak_mb = max(self.peak_mb, _anonymous_mb())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _anonymous_mb())


def _anonymous_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))


class Grid:
    """The cells of one preset on the primary dataset."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.p = args, PRESETS[args.preset]
        self.folder = args.cells / args.preset
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dataset = args.datasets[0]
        self.files = dataset_files(args, self.dataset)
        self.identity = data_identity(
            args, self.dataset, **{k: self.p[k] for k in ("max_length", "batch_size", "eval_size")}
        )

    def prepared(self, quantize: str | None = None):
        p = self.p
        return prepare(
            self.args.model,
            self.files[0],
            p["max_length"],
            "truncate",
            p["eval_size"],
            0,
            eval_data=self.files[1],
            quantize=quantize,
        )

    def _identify(self, quantize: str | None) -> dict:
        """Identification with the library's defaults (its budget from the preset) on the base loaded as `quantize`
        says: the selection, its seconds and tokens, and the resident memory before and at its peak (MiB)."""
        prepared = self.prepared(quantize)
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

    def _settings(self) -> dict:
        return {**self.identity, "stage1": self.p["stage1"], "stage2": self.p["stage2"], **ADAPTER}

    def mask(self) -> dict:
        """The mask every method is put on: identification on the unquantized base (selection and cost)."""

        def compute(stem: Path) -> dict:
            found = self._identify(None)
            return {k: found[k] for k in ("selection", "seconds", "tokens")}

        return cell(self.folder, "mask", self._settings(), compute, self.args.existing_only)

    def identification(self, quantize: str | None) -> dict:
        """Identification again, on the base unquantized or in 4 bits, with its memory: what QLoRA-style
        identification saves, and whether it finds the same layers."""
        settings = {**self._settings(), "quantize": quantize}
        return cell(self.folder, "identify", settings, lambda stem: self._identify(quantize), self.args.existing_only)

    def tune(self, method: str, lr: float, share: str, mask: dict) -> dict:
        """`method` at learning rate `lr` on a share of the layers of `mask`: a fine-tune of the preset's steps, and
        what it cost."""
        settings = {**self.identity, "method": method, "share": share, "steps": self.p["steps"], **ADAPTER}
        settings.update(mask=mask["settings"], lr=lr)

        def compute(stem: Path) -> dict:
            found = Selection.from_json(mask["selection"])
            k = SHARES[share]
            chosen = found.top(resolve_top_k(k, len(found.candidates))) if k else Selection.everything(found.candidates)
            prepared = self.prepared("4bit" if method == "qlora" else None)
            model, params = prepared.model, None
            if method == "full":
                params = train_only_selected(model, chosen)
            else:
                model = get_peft_model(
                    model, method_config(method, chosen, **ADAPTER, lora_dropout=0.0, steps=self.p["steps"])
                )
            report = finetune(
                model,
                prepared,
                self.p["steps"],
                settings["lr"],
                self.p["batch_size"],
                0,
                0.1,
                progress=self.args.progress,
                params=params,
            )
            # AdamW keeps two float32 tensors (exp_avg, exp_avg_sq) the size of every trainable parameter
            return {
                **asdict(report),
                "layers": len(chosen.selected),
                "optimizer_state_bytes": 8 * report.trainable_params,
            }

        return cell(self.folder, "tune", settings, compute, self.args.existing_only)


def run(args: argparse.Namespace) -> dict:
    grid = Grid(args)
    results = {"machine": machine(), "preset": args.preset, "rows": [], "missing": []}
    try:
        mask = grid.mask()
    except Missing as absent:
        return {**results, "missing": [f"the mask ({absent})"]}
    candidates = len(Selection.from_json(mask["selection"]).candidates)
    results["identification"] = {"seconds": mask["seconds"], "tokens": mask["tokens"], "candidates": candidates}
    for method, lr, share in ((m, lr, s) for m in args.methods for lr in LR.get(m, (1e-3,)) for s in SHARES):
        try:
            tuned = grid.tune(method, lr, share, mask)
        except Missing as absent:
            results["missing"].append(f"{method} at lr {lr:g} on {share} ({absent})")
            continue
        row = {"method": method, "lr": lr, "share": share}
        results["rows"].append(row | {k: v for k, v in tuned.items() if k != "losses"})
    mask_top = set(Selection.from_json(mask["selection"]).selected)
    results["identifications"] = []
    for quantize in QUANTIZE:
        try:
            found = grid.identification(quantize)
        except Missing as absent:
            results["missing"].append(f"identification on the {QUANTIZE[quantize]} base ({absent})")
            continue
        top = set(Selection.from_json(found["selection"]).selected)
        results["identifications"].append(
            {"base": QUANTIZE[quantize], "jaccard_with_mask": jaccard(top, mask_top)}
            | {k: found[k] for k in ("seconds", "tokens", "median_step_seconds", "memory")}
        )
    return results


def page(results: dict, args: argparse.Namespace) -> str:
    p = PRESETS[results["preset"]]
    lines = [
        "# Fine-tuning methods on an ILA selection",
        "",
        f"Written by `python benchmarks/methods.py --preset {results['preset']}` (`make bench-methods`) from the "
        f"cells in `benchmarks/results/methods/{results['preset']}`; {results['machine']['cpu_count']} CPU cores, "
        f"torch {results['machine']['torch']}. Each row: {p['steps']} AdamW steps of batch {p['batch_size']} at "
        f"max length {p['max_length']}, held-out loss on {p['eval_size']} examples. One mask, found once with the "
        f"library's defaults ({p['stage1']} + {p['stage2']} steps"
        + (f", {results['identification']['seconds']:.0f} s)." if "identification" in results else ")."),
        "Optimizer state: AdamW's two float32 tensors per trainable parameter. Memory: the peak rise of the process's "
        "resident memory during the fine-tune (CPU).",
        "",
        "| method | lr | layers | held-out loss before -> after | s/step | peak memory rise (MB) | trainable params "
        "| optimizer state (MB) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        loss = f"{row['loss_before']:.4f} -> {row['loss_after']:.4f}"
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {row['share']} ({row['layers']}) | {loss} "
            f"| {row['median_step_seconds']:.2f} | {row['memory']['rss_rise_mb']:.0f} | {row['trainable_params']:,} "
            f"| {row['optimizer_state_bytes'] / 2**20:.1f} |"
        )
    if results.get("identifications"):
        lines += identification_table(results["identifications"])
    answers = findings(results)
    if answers:
        lines += ["", "## Findings", "", *(f"{i}. {line}" for i, line in enumerate(answers, 1))]
    if results["missing"]:
        lines += ["", f"Not computed yet ({len(results['missing'])}; `make bench-methods` continues the grid):", ""]
        lines += [f"- {entry}" for entry in results["missing"]]
    return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
    """The page's answers, one line each (the README quotes them), derived by rule from the cells there are."""
    rows = {(r["method"], r["lr"], r["share"]): r for r in results["rows"]}
    runs = list(dict.fromkeys((m, lr) for m, lr, _ in rows))  # grid order
    gain = lambda row: row["loss_before"] - row["loss_after"]  # noqa: E731
    judged = [run for run in runs if (*run, "all") in rows and gain(rows[*run, "all"]) >= LEARNS]
    stalled = [run for run in runs if (*run, "all") in rows and run not in judged]
    lines = []
    for share in [s for s in SHARES if SHARES[s]]:
        parts = []
        for run in (r for r in judged if (*r, share) in rows):
            row, every = rows[*run, share], rows[*run, "all"]
            time = row["median_step_seconds"] / every["median_step_seconds"]
            memory = row["memory"]["rss_rise_mb"] / every["memory"]["rss_rise_mb"]
            parts.append(f"{_label(*run)} {gain(row) / gain(every):.0%} at {time:.2f}x, {memory:.2f}x")
        if parts:
            lines.append(
                f"**{share} against all layers** — the share of the all-layers loss gain kept, at that step time and "
                f"peak memory rise (x all layers): {'; '.join(parts)}."
            )
    if stalled:
        said = ", ".join(f"{_label(*run)} ({gain(rows[*run, 'all']):.4f})" for run in stalled)
        lines.append(
            f"**Too short to judge** — on all layers, {said} lowered the held-out loss by less than {LEARNS} in "
            f"{PRESETS[results['preset']]['steps']} steps; their shares are not compared."
        )
    full = {share: rows[run] for run in rows if run[0] == "full" for share in [run[2]]}
    lora = rows.get(("lora", 1e-3, "all"))
    if "all" in full and "ILA top 25%" in full and lora:
        mb = {share: row["optimizer_state_bytes"] / 2**20 for share, row in full.items()}
        lines.append(
            f"**Optimizer state of full fine-tuning** — {mb['all']:.0f} MB on all layers, {mb['ILA top 25%']:.0f} MB "
            f"on ILA's top 25% ({mb['ILA top 25%'] / mb['all']:.2f}x), against "
            f"{lora['optimizer_state_bytes'] / 2**20:.1f} MB for LoRA on all layers."
        )
    lines += _identification_findings(results, lora)
    return lines


def _identification_findings(results: dict, lora: dict | None) -> list[str]:
    found = {row["base"]: row for row in results.get("identifications", [])}
    plain, small = found.get(QUANTIZE[None]), found.get(QUANTIZE["4bit"])
    if not (plain and small and lora):
        return []
    candidates = results["identification"]["candidates"]
    k = resolve_top_k(0.25, candidates)
    weights = {row["base"]: row["memory"]["weights_mb"] for row in (plain, small)}
    need = {row["base"]: weights[row["base"]] + _own_peak_mb(row) for row in (plain, small)}
    step = small["median_step_seconds"] / plain["median_step_seconds"]
    mask_seconds = results["identification"]["seconds"]
    return [
        f"**Identification's cost** — the mask took {mask_seconds:.0f} s, as long as "
        f"{mask_seconds / lora['median_step_seconds']:.0f} steps of LoRA on all layers.",
        f"**Identification on a 4-bit base** — weights {weights[small['base']]:.0f} MB against "
        f"{weights[plain['base']]:.0f} MB; weights and identification's own peak {need[small['base']]:.0f} MB "
        f"against {need[plain['base']]:.0f} MB ({need[small['base']] / need[plain['base']]:.2f}x); "
        f"{small['median_step_seconds']:.2f} s per stage-1 step against {plain['median_step_seconds']:.2f} s "
        f"({step:.2f}x); its top 25% overlaps the unquantized mask's at Jaccard {small['jaccard_with_mask']:.2f} "
        f"(two random top-25% sets: {expected_random_jaccard(candidates, k):.2f}).",
    ]


def _label(method: str, lr: float) -> str:
    """A method's name, with its learning rate where it has more than one row."""
    return method if len(LR.get(method, (1e-3,))) == 1 else f"{method} at lr {lr:g}"


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
        "| base | seconds | s/stage-1 step | weights (MB) | own peak (MB) | weights + own peak (MB) | peak RSS (MB) "
        "| top-25% Jaccard with the mask |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        memory, own = row["memory"], _own_peak_mb(row)
        lines.append(
            f"| {row['base']} | {row['seconds']:.0f} | {row['median_step_seconds']:.2f} | {memory['weights_mb']:.0f} "
            f"| {own:.0f} | {memory['weights_mb'] + own:.0f} | {memory['peak_rss_mb']:.0f} "
            f"| {row['jaccard_with_mask']:.2f} |"
        )
    return lines


def _own_peak_mb(row: dict) -> float:
    """What identification itself took above the loaded model: the rise of anonymous memory (MiB)."""
    return row["memory"]["anonymous_peak_mb"] - row["memory"]["anonymous_start_mb"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inputs(parser, PRESETS)
    add_cell_options(parser, ROOT / "benchmarks" / "results" / "methods", ROOT / "benchmarks" / "METHODS.md")
    parser.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS), help="comma-separated")
    return parsed_inputs(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    _offline_and_quiet()
    results = run(args)
    write_study(args, "methods", results, page(results, args))
    return results


if __name__ == "__main__":
    main()
