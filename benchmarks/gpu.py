"""ILA's step time and memory at the sizes users run, on one GPU.

    python -m benchmarks.gpu --out DIR                              # Llama-3.2-1B and Llama-3.1-8B shapes, bf16
    python -m benchmarks.gpu --shapes tiny --device cpu --out DIR   # the test suite's smoke run

Models of real shapes are built with random weights (step time and memory do not depend on the values) in bf16 on
the device, fed random tokens. For each shape, with and without gradient checkpointing, every method trains side by
side in one process, a few AdamW steps each in turn per round: seconds per step, tokens per second, and the peak
CUDA memory allocated above the loaded model. Identification's two stages are timed the same way (the probe state:
adapters on every candidate; then its gates), and its wall time at the library's default budget is projected from
them (stage-1 steps x a stage-1 step + stage-2 steps x a stage-2 step, labelled as projected).

ILA's selections here are not found on these random weights (they would mean nothing): the ranking of ILA's mask
on alpaca for SmolLM2-135M (the grid's cell) is carried over by relative depth, which is what step time and memory
depend on. Last, `benchmarks.gpu_trainer` runs `Trainer` + `ILACallback` under accelerate's FSDP2 on
--trainer-shape, in a process of its own. Writes `gpu.json` and `GPU.md` to --out after every step, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.core.page import table
from peft_ila import ILAConfig, LayerSampler, LayerwiseConfig, resolve_top_k
from peft_ila.app.files import write_json
from peft_ila.app.models import enable_activation_checkpointing
from peft_ila.app.report import machine
from peft_ila.tuner.atomic import written_atomically
from peft_ila.tuner.layerwise import block_groups

ROOT = Path(__file__).resolve().parents[1]  # not benchmarks.core.inputs: the GPU machine needs no data packages
SHAPES = {  # the configs' shapes (hidden, MLP, blocks, heads, key-value heads, vocabulary); weights are random
    "llama-3.2-1b": dict(hidden=2048, mlp=8192, blocks=16, heads=32, kv=8, vocab=128256, tied=True),
    "llama-3.1-8b": dict(hidden=4096, mlp=14336, blocks=32, heads=32, kv=8, vocab=128256, tied=False),
    "tiny": dict(hidden=64, mlp=128, blocks=4, heads=4, kv=2, vocab=256, tied=True),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora-all", "ila-25", "ila-75", "last-25", "lisa", "probe-stage1", "probe-stage2")
ADAPTER, LR, LISA = dict(r=8, lora_alpha=16), 1e-4, dict(active=2, interval=1)  # LISA re-drawn every step here
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # a user's dtype on a GPU; the smoke run's on a CPU
SOURCE_MASK = ROOT / "benchmarks" / "results" / "grid" / "full" / "mask-e4f94778d06b.json"  # alpaca, SmolLM2-135M


def build(shape: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama of `shape` with random weights, in `dtype` on `device`."""
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["blocks"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"],
        use_cache=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` at once: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    return model


def carried_ranking(source: list[str], blocks: int) -> list[str]:
    """A ranking of a `blocks`-block Llama's candidates from `source`, a ranking of another Llama's: each layer maps
    to the same projection at the same relative depth (the first time that layer comes up), the rest after it in
    model order."""
    source_blocks = 1 + max(int(name.split(".")[2]) for name in source)
    ranking: list[str] = []
    for name in source:
        _, _, index, _, projection = name.split(".")
        mapped = f"model.layers.{int(index) * blocks // source_blocks}.{name.split('.', 3)[3]}"
        if projection in PROJECTIONS and mapped not in ranking:
            ranking.append(mapped)
    every = [f"model.layers.{i}.{kind}.{p}" for i in range(blocks) for kind, p in _kinds()]
    return ranking + [name for name in every if name not in ranking]


def _kinds() -> list[tuple[str, str]]:
    return [("self_attn", p) for p in PROJECTIONS[:4]] + [("mlp", p) for p in PROJECTIONS[4:]]


def prepared(model: torch.nn.Module, method: str, ranking: list[str], blocks: int):
    """(the model to train, its parameters or a layerwise sampler) for `method`; `unwrap(model)` undoes it."""
    k = lambda share: resolve_top_k(share, len(ranking))  # noqa: E731
    if method == "lora-all":
        return get_peft_model(model, LoraConfig(target_modules="all-linear", **ADAPTER)), None
    if method in ("ila-25", "ila-75"):
        layers = ranking[: k(0.25 if method == "ila-25" else 0.75)]
        return get_peft_model(model, ILAConfig(selected_layers=layers, **ADAPTER)), None
    if method == "last-25":
        last = [f"model.layers.{i}" for i in range(blocks - max(1, blocks // 4), blocks)]
        layers = [name for name in ranking if name.rsplit(".", 2)[0] in last]
        return get_peft_model(model, ILAConfig(selected_layers=layers, **ADAPTER)), None
    if method == "lisa":
        groups = block_groups(model, ranking)
        return model, LayerSampler(groups, LayerwiseConfig(**LISA))
    return get_peft_model(model, ILAConfig(**ADAPTER)), None  # the probe state: adapters on every candidate


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The base model again, its adapters removed (or, after LISA, its weights frozen)."""
    base = model.unload() if hasattr(model, "unload") else model
    base.requires_grad_(False)
    return base


def timed_steps(model, method: str, sampler, batch: dict, steps: int) -> tuple[list[float], float | None]:
    """`steps` AdamW steps on one batch: the seconds of each after the first, and the peak device memory allocated
    above what was allocated before (MB; None off CUDA)."""
    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    params = sampler.parameters() if sampler else [p for p in model.parameters() if p.requires_grad]
    if sampler:
        sampler.train_only_groups(model)
    optimizer = torch.optim.AdamW(params, lr=LR)
    seconds = []
    with model.base_model.gate_stage() if method == "probe-stage2" else contextlib.nullcontext():
        for step in range(steps):
            if sampler:
                sampler.at_step(step, optimizer)
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    del optimizer
    return seconds[1:], peak


def measure(name: str, args: argparse.Namespace, ranking_source: list[str]) -> dict:
    """Every method on shape `name`, with and without gradient checkpointing, side by side."""
    shape = SHAPES[name]
    model = build(shape, args.device, DTYPE[args.device.split(":")[0]])
    ranking = carried_ranking(ranking_source, shape["blocks"])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.length), generator=generator).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        took: dict[str, list[float]] = {m: [] for m in METHODS}
        peaks: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for method in METHODS:
                wrapped, sampler = prepared(model, method, ranking, shape["blocks"])
                seconds, peak = timed_steps(wrapped, method, sampler, batch, args.steps)
                model = unwrap(wrapped)
                took[method] += seconds
                peaks[method].append(peak)
        for method in METHODS:
            step = statistics.mean(took[method])
            peak = None if None in peaks[method] else max(peaks[method])
            row = {"method": method, "checkpointing": checkpointing, "step_seconds": step, "peak_mb": peak}
            rows.append({**row, "tokens_per_second": args.batch * args.length / step})
        model.gradient_checkpointing_disable()
    defaults = ILAConfig()
    params = sum(p.numel() for p in model.parameters())
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    dtype = str(DTYPE[args.device.split(":")[0]]).removeprefix("torch.")
    return {
        "shape": name,
        **shape,
        "parameters": params,
        "dtype": dtype,
        "rows": rows,
        "budget": projected(rows, defaults),
    }


def projected(rows: list[dict], defaults: ILAConfig) -> dict:
    """Identification's wall time at the library's default budget, projected from the timed stage steps (without
    gradient checkpointing)."""
    step = {r["method"]: r["step_seconds"] for r in rows if not r["checkpointing"]}
    seconds = defaults.stage1_max_steps * step["probe-stage1"] + defaults.stage2_steps * step["probe-stage2"]
    lora_steps = seconds / step["lora-all"]
    budget = {"stage1": defaults.stage1_max_steps, "stage2": defaults.stage2_steps}
    return {**budget, "seconds": seconds, "lora_all_steps": lora_steps}


def page(results: dict) -> str:
    lines = [
        "# ILA on a GPU at real sizes",
        "",
        f"Written by `python -m benchmarks.gpu` on {results['machine'].get('gpu') or 'a machine without a GPU'}; "
        f"batch {results['batch']} x {results['length']} tokens, random weights and tokens; "
        f"{results['rounds']} rounds of {results['steps']} steps per method (the first of each not timed).",
        "",
    ]
    for shape in results["shapes"]:
        lora = {r["checkpointing"]: r for r in shape["rows"] if r["method"] == "lora-all"}
        body = []
        for r in shape["rows"]:
            base = lora[r["checkpointing"]]
            peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f} ({r['peak_mb'] / base['peak_mb']:.2f}x)"
            ratio = f"{r['step_seconds'] / base['step_seconds']:.2f}"
            speed = [f"{r['step_seconds']:.3f}", ratio, f"{r['tokens_per_second']:,.0f}"]
            body.append([r["method"], "yes" if r["checkpointing"] else "no", *speed, peak])
        budget = shape["budget"]
        head = ["method", "checkpointing", "s/step", "x LoRA-all", "tokens/s", "peak MB above the model (x LoRA-all)"]
        lines += [f"## {shape['shape']} ({shape['parameters']:,} parameters, {shape['dtype']})", ""]
        lines += [*table(head, body, "llrrrr"), ""]
        lines += [
            f"Identification at the default budget ({budget['stage1']} + {budget['stage2']} steps), projected: "
            f"{budget['seconds']:.0f} s, {budget['lora_all_steps']:.0f} LoRA-all steps.",
            "",
        ]
    return "\n".join([*lines, *trainer_section(results.get("trainer"))]) + "\n"


def trainer_section(record: dict | None) -> list[str]:
    """The Trainer + ILACallback run under FSDP2, in a few lines."""
    if record is None:
        return []
    head = [f"## Trainer + ILACallback under FSDP2 ({record['shape']}, one process)", ""]
    if "error" in record:
        return [*head, "It failed:", "", "```", record["error"], "```", ""]
    losses = ", ".join(f"{loss:.3f}" for loss in record["fine_tune_losses"])
    return [
        *head,
        f"Parameters sharded by FSDP2: {'yes' if record['fsdp2'] else 'no (the Trainer ran without FSDP)'}. "
        f"Identification on the sharded probe: {record['stage1_steps']} + {record['stage2_steps']} steps, "
        f"{record['selected']} of {record['candidates']} layers selected; fine-tune losses {losses}; saved "
        f"{', '.join(record['saved'])}; reloaded on a fresh base, the largest logit difference is "
        f"{record['reload_max_abs_logit_difference']:.3g} (the adapter moves logits by up to "
        f"{record['adapter_max_abs_logit_effect']:.3g}).",
        "",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help="comma-separated, from SHAPES")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per method per round (the first not timed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--trainer-shape", default="llama-3.2-1b", help="Trainer + ILACallback under FSDP2 on it")
    args = parser.parse_args(argv)
    source = json.loads(SOURCE_MASK.read_text())["selection"]["ranking"]
    results = {"machine": machine(), **{k: getattr(args, k) for k in ("batch", "length", "rounds", "steps")}}
    results["shapes"] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        results["shapes"].append(measure(name, args, source))
        written(results, args.out)
        print(f"{name}: measured", flush=True)
    results["trainer"] = trainer_under_fsdp2(args.trainer_shape, args.device, args.out / "trainer")
    written(results, args.out)
    return results


def written(results: dict, out: Path) -> None:
    """`gpu.json` and `GPU.md` in `out`, each replaced whole."""
    write_json(out / "gpu.json", results)
    with written_atomically(out / "GPU.md") as tmp:
        tmp.write_text(page(results))


def trainer_under_fsdp2(shape: str, device: str, out: Path) -> dict:
    """`benchmarks.gpu_trainer` in its own process (torchrun, one rank: accelerate's FSDP2 needs a process group, and
    this process's accelerator state must not leak into it); its record, or the error's last lines."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += ["-m", "benchmarks.gpu_trainer", "--shape", shape, "--device", device, "--out", str(out)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if done.returncode != 0:
        return {"shape": shape, "error": done.stderr[-3000:]}
    return json.loads((out / "trainer.json").read_text())


if __name__ == "__main__":
    main()
