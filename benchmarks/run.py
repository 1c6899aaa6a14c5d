"""ILA against LoRA on all layers and other layer selectors, side by side in one process, on a real model and real
alignment data. Writes benchmarks/results/<name>.json (one file per invocation) and regenerates
benchmarks/RESULTS.md.

    python benchmarks/run.py --preset quick   # minutes: smoke-sized budgets
    python benchmarks/run.py --preset full    # the committed run (about an hour on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks import baselines  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from peft_ila import ILAConfig, ILALayer, identify_important_layers, resolve_top_k  # noqa: E402
from peft_ila.app import UsageError  # noqa: E402
from peft_ila.app.cli import _offline_and_quiet  # noqa: E402
from peft_ila.app.data import fingerprint  # noqa: E402
from peft_ila.app.files import write_json  # noqa: E402
from peft_ila.app.pipeline import Prepared, finetune, identify, lora_all_layers, prepare  # noqa: E402
from peft_ila.app.report import machine  # noqa: E402
from peft_ila.identification.training import evaluate_loss  # noqa: E402
from peft_ila.tuner.selection import layer_of  # noqa: E402

PRESETS = {  # tokens per example, batch, held-out examples, fine-tune steps, ILA budget, LISA period, timing batches
    "quick": dict(
        max_length=64,
        batch_size=2,
        eval_size=8,
        steps=4,
        stage1=6,
        stage2=3,
        window=3,
        lisa_every=2,
        lengths=[0.5, 1.0, 2.0],
        seeds=[0, 1, 2],
        gradnorm_steps=2,
        timing_batches=2,
    ),
    "full": dict(
        max_length=128,
        batch_size=4,
        eval_size=32,
        steps=20,
        stage1=32,
        stage2=16,
        window=8,
        lisa_every=5,
        lengths=[0.25, 0.5, 1.0, 2.0],
        seeds=[0, 1, 2],
        gradnorm_steps=4,
        timing_batches=2,
    ),
}
COMMON = dict(r=8, lora_alpha=16, lr=1e-3, low=0.25, high=0.75)  # the same for every method
DATASETS = {  # name -> (training data, separate held-out file or None); {shared} is ../shared beside the checkout
    "alpaca": ("alpaca_en_demo", None),
    "lima": ("{shared}/data/lima_1k.json", None),
    "dolly": ("{shared}/data/dolly_train_4k.json", "{shared}/data/dolly_test_200.json"),
}
PRIMARY, TRANSFER_FROM = "alpaca", "lima"  # the full grid runs on PRIMARY, with masks also transferred from lima


def dataset_files(args: argparse.Namespace, name: str) -> tuple[str, str | None]:
    """Dataset `name`'s training data spec and its held-out file (None: split off the training data), `{shared}`
    filled in; a `--data NAME=FILE` replaces both."""
    data, eval_data = DATASETS[name] if name not in args.data else (args.data[name], None)
    return tuple(s.format(shared=args.shared) if s else s for s in (data, eval_data))


def absent(args: argparse.Namespace, name: str) -> str | None:
    """Why dataset `name` cannot be read here (its file under ../shared is missing), or None when it can."""
    data = dataset_files(args, name)[0]
    if name in args.data or "{shared}" not in DATASETS[name][0] or Path(data).exists():
        return None
    return f"skipping {name}: {data} is absent (../shared holds it beside a developer checkout)"


def data_identity(args: argparse.Namespace, name: str, **shape) -> dict:
    """What a benchmark cell depends on besides its own settings: the dataset, its data's SHA-256, the model, and
    the `shape` of the examples and batches."""
    return {"dataset": name, "data_sha256": fingerprint(dataset_files(args, name)[0])[1], "model": args.model, **shape}


def median_seconds(fn, batches) -> float:
    """Median wall seconds of fn(batch) over the batches, after one warm-up call."""
    fn(batches[0])
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flat_costs(result) -> dict:
    """An ILAResult's stages as the flat fields of this benchmark's records (`stage1_steps`, ..., `stage1_stop`), the
    format of benchmarks/results/*.json."""
    out = {"stage1_stop": result.stage1.stop_reason}
    for name, stage in (("stage1", result.stage1), ("stage2", result.stage2)):
        out.update({f"{name}_{what}": getattr(stage, what) for what in ("steps", "tokens", "seconds", "losses")})
    return out


def default_probe(model: torch.nn.Module, stage1: int, stage2: int, adapter: dict, seed: int = 0) -> torch.nn.Module:
    """`model` wrapped for ILA with the library's defaults, `adapter` shape, stage budgets `stage1` + `stage2`
    steps, top 25% and identification `seed`."""
    budget = dict(stage1_max_steps=stage1, stage2_steps=stage2, top_k=0.25, seed=seed)
    return get_peft_model(model, ILAConfig(task_type="CAUSAL_LM", **adapter, **budget))


def default_identification(probe: torch.nn.Module, batches, progress: bool):
    """Identification on a `default_probe`: the `ILAResult` and the mask a benchmark cell keeps (`selection` as
    JSON, `seconds`, `tokens`)."""
    result = identify_important_layers(probe, batches, progress=progress)
    stages = (result.stage1, result.stage2)
    mask = {
        "selection": result.selection.to_json(),
        "seconds": sum(s.seconds for s in stages),
        "tokens": sum(s.tokens for s in stages),
    }
    return result, mask


def step_costs(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """Seconds per batch: inference, and where something trains, forward with autograd and forward + backward (no
    optimizer)."""

    def forward(batch):
        model(**batch).loss.detach()

    def forward_backward(batch):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        costs = {"inference_s": median_seconds(forward, batches)}
    if any(p.requires_grad for p in model.parameters()):
        costs["forward_s"] = median_seconds(forward, batches)
        costs["forward_backward_s"] = median_seconds(forward_backward, batches)
    return costs


class Bench:
    """One invocation: the datasets it could load, their ILA runs, and every fine-tune record."""

    def __init__(self, args: argparse.Namespace, preset: dict) -> None:
        self.args, self.p = args, preset
        self.out: dict = {"datasets": {}, "identifications": [], "records": [], "step_costs": {}}
        self.base: torch.nn.Module | None = None  # one pristine base model; every method works on a copy

    def copy_base(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)

    def config(self, **fields) -> ILAConfig:
        return ILAConfig(task_type="CAUSAL_LM", r=COMMON["r"], lora_alpha=COMMON["lora_alpha"], **fields)

    def batches(self, prepared: Prepared, held_out: bool = False):
        return prepared.batches(self.p["batch_size"], 0, held_out=held_out)

    def timing_batches(self, prepared: Prepared) -> list:
        """The first training batches: one warm-up plus the timed ones."""
        return list(itertools.islice(self.batches(prepared), self.p["timing_batches"] + 1))

    def load(self, name: str) -> Prepared | None:
        if why := absent(self.args, name):
            print(why)
            return None
        data, eval_data = dataset_files(self.args, name)
        prepared = prepare(
            self.args.model, data, self.p["max_length"], "truncate", self.p["eval_size"], 0, eval_data=eval_data
        )
        if self.base is None:
            self.base = prepared.model.eval()
        prepared = replace(prepared, model=self.base)
        base_loss = evaluate_loss(self.base, self.batches(prepared, held_out=True))
        self.out["datasets"][name] = {**prepared.info, "loss_before": base_loss}
        return prepared

    # --- identification ------------------------------------------------------------------------------------------

    def identify(self, dataset: str, prepared: Prepared, seed: int = 0, length: float | None = None) -> dict:
        """ILA as the paper runs it (learned gates; stage 1 until epsilon-stable or its cap), with the preset budget
        and the settings RESULTS.md was written with (not the library's defaults, which the stability study chose);
        with a `length`, stage 1 runs for exactly that fraction of the cap."""
        cap = max(1, round(self.p["stage1"] * (length or 1.0)))
        fixed = {"estimator": "gates", "stability_epsilon": 1e-12 if length is not None else 0.01}
        config = self.config(
            top_k=COMMON["low"],
            stage1_max_steps=cap,
            stage2_steps=self.p["stage2"],
            seed=seed,
            stability_window=self.p["window"],
            **fixed,
        )
        _, result = identify(
            replace(prepared, model=self.copy_base()), config, self.p["batch_size"], seed, progress=self.args.progress
        )
        selection = result.selection
        n = len(selection.candidates)
        record = {
            "dataset": dataset,
            "seed": seed,
            "stage1_length": length,
            "stage1_cap": cap,
            "candidates": n,
            "k_low": resolve_top_k(COMMON["low"], n),
            "k_high": resolve_top_k(COMMON["high"], n),
            "scores": dict(selection.scores),
            "ranking": list(selection.ranking),
            "selected": list(selection.selected),
            "update_norms": result.update_norms,
            **flat_costs(result),
        }
        self.out["identifications"].append(record)
        print(
            f"  ILA on {dataset} (seed {seed}, stage 1 length {length or 'default'}): {result.stage1.steps} + "
            f"{result.stage2.steps} steps, {result.stage1.seconds + result.stage2.seconds:.0f} s, stage 1 "
            f"{result.stage1.stop_reason}"
        )
        return record

    # --- fine-tuning ---------------------------------------------------------------------------------------------

    def finetune(
        self,
        dataset: str,
        prepared: Prepared,
        method: str,
        family: str,
        model,
        layers=None,
        seed=0,
        cost=None,
        lowest=None,
        **kwargs,
    ) -> dict:
        info = self.out["datasets"][dataset]
        report = finetune(
            model,
            prepared,
            self.p["steps"],
            COMMON["lr"],
            self.p["batch_size"],
            0,
            progress=self.args.progress,
            loss_before=info["loss_before"],
            **kwargs,
        )
        record = {
            "dataset": dataset,
            "method": method,
            "family": family,
            "seed": seed,
            "layers": None if layers is None else len(layers),
            "lowest_block": lowest,
            "cost": cost,
            "ppl_before": math.exp(report.loss_before),
            "ppl_after": math.exp(report.loss_after),
            **{k: v for k, v in asdict(report).items() if k != "losses"},
        }
        self.out["records"].append(record)
        print(
            f"  {dataset:<7} {method:<44} loss {report.loss_before:.4f} -> {report.loss_after:.4f} "
            f"{report.median_step_seconds:6.2f} s/step {report.memory.get('rss_rise_mb', 0):7.0f} MB rise"
        )
        return record

    def on_layers(self, dataset, prepared, method, family, layers, blocks, **kwargs) -> dict:
        """Fine-tune ILA adapters on exactly `layers` (the selected state: plain LoRA updates there, nothing else)."""
        model = get_peft_model(self.copy_base(), self.config(selected_layers=layers))
        lowest = min(blocks.index(layer_of(name, "block")) for name in layers)
        return self.finetune(dataset, prepared, method, family, model, layers, lowest=lowest, **kwargs)

    def lisa(self, dataset, prepared, candidates, blocks, seed: int = 0) -> dict:
        """LISA-style: adapters everywhere, but only those of a few random blocks train, re-drawn every few steps."""
        model = get_peft_model(self.copy_base(), self.config(selected_layers=candidates))
        by_block: dict[str, list] = {b: [] for b in blocks}
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, ILALayer):
                by_block[layer_of(name, "block")] += [module.ila_A["default"].weight, module.ila_B["default"].weight]
        rng, n = random.Random(seed), resolve_top_k(COMMON["low"], len(blocks))

        def redraw(step: int = 0) -> None:
            if step % self.p["lisa_every"] == 0:
                active = set(rng.sample(blocks, n))
                for block, params in by_block.items():
                    for param in params:
                        param.requires_grad_(block in active)

        redraw()
        params = [p for ps in by_block.values() for p in ps]
        method = f"LISA-style ({n} blocks, re-drawn every {self.p['lisa_every']} steps)"
        on_step = lambda stats: redraw(stats.steps)  # noqa: E731
        return self.finetune(dataset, prepared, method, "lisa", model, seed=seed, params=params, on_step=on_step)

    def grid(self, name: str, prepared: Prepared, ila: dict, full: bool) -> None:
        own = ila[name]
        candidates = list(own["scores"])  # model order
        blocks = baselines.blocks(candidates)
        k, k_high, ranking = own["k_low"], own["k_high"], own["ranking"]
        cost = {
            key: own[key]
            for key in (
                "stage1_steps",
                "stage1_tokens",
                "stage1_seconds",
                "stage2_steps",
                "stage2_tokens",
                "stage2_seconds",
                "stage1_stop",
            )
        }
        lora = lora_all_layers(replace(prepared, model=self.copy_base()), COMMON["r"], COMMON["lora_alpha"], 0.0, None)
        timing = self.timing_batches(prepared)
        self.out["step_costs"][name] = step_costs(lora, timing)
        print(f"fine-tuning on {name} ({'full grid' if full else 'core methods'}), {self.p['steps']} steps each")
        self.finetune(name, prepared, "LoRA on all layers", "lora-all", lora, candidates, lowest=0)
        self.on_layers(name, prepared, "ILA top-25%", "ila", ranking[:k], blocks, cost=cost)
        self.on_layers(name, prepared, "ILA top-75%", "ila", ranking[:k_high], blocks, cost=cost)
        if full and TRANSFER_FROM in ila:
            other = ila[TRANSFER_FROM]["ranking"]
            self.on_layers(name, prepared, f"ILA top-25%, mask from {TRANSFER_FROM}", "ila-transfer", other[:k], blocks)
            self.on_layers(
                name, prepared, f"ILA top-75%, mask from {TRANSFER_FROM}", "ila-transfer", other[:k_high], blocks
            )
        for seed in self.p["seeds"]:
            self.on_layers(
                name, prepared, "random 25%", "random", baselines.random_layers(candidates, k, seed), blocks, seed=seed
            )
        if not full:
            return
        for method, last in (("first 25% of blocks", False), ("last 25% of blocks", True)):
            self.on_layers(
                name, prepared, method, "position", baselines.edge_blocks(candidates, COMMON["low"], last), blocks
            )
        selections = {
            "KappaTune 25% (lowest condition number)": (
                "data-free",
                lambda: baselines.kappa_layers(self.base, candidates, k),
            ),
            "Spectrum-style SNR 25%": ("data-free", lambda: baselines.spectrum_layers(self.base, candidates, k)),
            "adapter gradient norm 25%": ("proxy", lambda: self.gradnorm(prepared, k)),
        }
        for method, (family, choose) in selections.items():
            start = time.perf_counter()
            layers = choose()
            self.on_layers(
                name, prepared, method, family, layers, blocks, cost={"selection_seconds": time.perf_counter() - start}
            )
        stage1_only = {key: cost[key] for key in ("stage1_steps", "stage1_tokens", "stage1_seconds", "stage1_stop")}
        self.on_layers(
            name,
            prepared,
            "||BA|| after stage 1 25% (no stage 2)",
            "proxy",
            baselines.top_k(own["update_norms"], k),
            blocks,
            cost=stage1_only,
        )
        self.lisa(name, prepared, candidates, blocks)

    def gradnorm(self, prepared: Prepared, k: int) -> list[str]:
        probe = get_peft_model(self.copy_base(), self.config())
        return baselines.gradnorm_layers(probe, self.batches(prepared), self.p["gradnorm_steps"], k, COMMON["lr"])

    def overhead(self, prepared: Prepared, own: dict) -> dict:
        """Probe-state gates against plain LoRA (forward + backward), and merged inference against the base."""
        batches = self.timing_batches(prepared)
        probe = get_peft_model(self.copy_base(), self.config())
        stage1 = step_costs(probe, batches)
        with probe.base_model.gate_stage():
            stage2 = step_costs(probe, batches)
        selected = get_peft_model(self.copy_base(), self.config(selected_layers=own["ranking"][: own["k_low"]]))
        unmerged = step_costs(selected, batches)
        return {
            "lora_all": self.out["step_costs"][PRIMARY],
            "probe_stage1": stage1,
            "probe_stage2": stage2,
            "base": step_costs(self.base, batches),
            "ila_top25": unmerged,
            "ila_top25_merged": step_costs(selected.merge_and_unload(), batches),
        }

    def run(self) -> dict:
        loaded = {name: self.load(name) for name in self.args.datasets}
        loaded = {name: prepared for name, prepared in loaded.items() if prepared is not None}
        if PRIMARY not in loaded:
            raise UsageError(f"the primary dataset {PRIMARY} could not be loaded")
        print("identification (ILA stages 1 and 2)")
        ila = {name: self.identify(name, prepared) for name, prepared in loaded.items()}
        for seed in self.p["seeds"][1:]:
            self.identify(PRIMARY, loaded[PRIMARY], seed=seed)
        for length in self.p["lengths"]:
            if length == 1.0 and ila[PRIMARY]["stage1_stop"] == "max_steps":  # the same run (deterministic): reuse
                self.out["identifications"].append({**ila[PRIMARY], "stage1_length": 1.0})
            else:
                self.identify(PRIMARY, loaded[PRIMARY], length=length)
        for name, prepared in loaded.items():
            self.grid(name, prepared, ila, full=name == PRIMARY)
        self.out["overhead"] = self.overhead(loaded[PRIMARY], ila[PRIMARY])
        return self.out


def add_inputs(parser: argparse.ArgumentParser, presets: dict) -> None:
    """The options every benchmark script takes: preset, model, datasets, their files, progress bars."""
    parser.add_argument("--preset", choices=sorted(presets), default="quick")
    parser.add_argument("--model", default="smollm2", help="as for peft-ila (default: %(default)s)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, the first is the primary")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="use FILE for dataset NAME, split like alpaca (the smoke tests use tiny files)",
    )
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def parsed_inputs(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, with --datasets as a list and --data as a dict."""
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.data = dict(item.split("=", 1) for item in args.data)
    return args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inputs(parser, PRESETS)
    parser.add_argument("--name", help="results file name (default: the preset)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="JSON output folder")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="report to write")
    return parsed_inputs(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    _offline_and_quiet()
    started = time.perf_counter()
    output = Bench(args, PRESETS[args.preset]).run()
    output["meta"] = {
        "name": args.name or args.preset,
        "settings": {"preset": args.preset, **COMMON, **PRESETS[args.preset], "model": args.model},
        "command": shlex.join(["python", "benchmarks/run.py", *argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{output['meta']['name']}.json"
    write_json(path, output)
    write_report(args.results, args.markdown)
    print(f"wrote {path} and {args.markdown} in {output['meta']['seconds']:.0f} s")
    return output


if __name__ == "__main__":
    main()
