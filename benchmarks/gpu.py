"""ILA's step time and memory at the sizes users run, on one GPU.

    python -m benchmarks.gpu --out DIR                              # Llama-3.2-1B and Llama-3.1-8B shapes, bf16
    python -m benchmarks.gpu --shapes tiny --device cpu --out DIR   # the test suite's smoke run

Models of real shapes are built with random weights (step time and memory do not depend on the values) in bf16 on
the device, fed random tokens. For each shape, with and without gradient checkpointing, every method trains side by
side in one process (the library's `side_by_side` of `train_briefly`: a few AdamW steps each in turn per round):
seconds per step, tokens per second, and the peak CUDA memory allocated above the loaded model. Identification's two
stages are timed the same way (the probe state: adapters on every candidate; then only its gates), and its wall time
at the library's default budget is projected from them (and labelled as projected).

ILA's selections here are not found on these random weights (they would mean nothing): the ranking of ILA's mask
on alpaca for SmolLM2-135M (the grid's cell) is carried over by relative depth, which is what step time and memory
depend on. Last, `benchmarks.gpu_trainer` runs `Trainer` + `ILACallback` under accelerate's FSDP2 on
--trainer-shape, in a process of its own. Writes `gpu.json` and `GPU.md` to --out after every step, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.core.page import Column, columns, number
from benchmarks.core.recipes import side_by_side, train_briefly
from peft_ila import ILAConfig, LayerSampler, LayerwiseConfig, resolve_top_k
from peft_ila.app.files import write_json
from peft_ila.app.judge import ratio
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
LLAMA = dict(  # a shape's names -> LlamaConfig's
    hidden="hidden_size", mlp="intermediate_size", blocks="num_hidden_layers", heads="num_attention_heads",
    kv="num_key_value_heads", vocab="vocab_size", tied="tie_word_embeddings",
)  # fmt: skip
KINDS = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
KINDS += [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]  # a block's candidates: (module, projection)
METHODS = ("lora-all", "ila-25", "ila-75", "last-25", "lisa", "probe-stage1", "probe-stage2")
ADAPTER, LR, LISA = dict(r=8, lora_alpha=16), 1e-4, dict(active=2, interval=1)  # LISA re-drawn every step here
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # a user's dtype on a GPU; the smoke run's on a CPU
SOURCE_MASK = ROOT / "benchmarks" / "results" / "grid" / "full" / "mask-e4f94778d06b.json"  # alpaca, SmolLM2-135M


def build(shape: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama of `shape` with random weights, in `dtype` on `device`, frozen."""
    config = LlamaConfig(**{LLAMA[k]: v for k, v in shape.items()}, use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` at once: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def random_batch(vocab: int, size: int, length: int) -> dict[str, torch.Tensor]:
    """`size` sequences of `length` random tokens (seed 0), each its own labels: input_ids, attention_mask and labels,
    each (size, length)."""
    ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def carried_ranking(source: list[str], blocks: int) -> list[str]:
    """A ranking of a `blocks`-block Llama's candidates from `source`, a ranking of another Llama's: each layer maps
    to the same projection at the same relative depth (the first time that layer comes up), the rest after it in
    model order."""
    source_blocks = 1 + max(int(name.split(".")[2]) for name in source)
    every = [f"model.layers.{i}.{kind}.{p}" for i in range(blocks) for kind, p in KINDS]
    mapped = (name.split(".", 3) for name in source)  # ["model", "layers", block, "<module>.<projection>"]
    ranking = dict.fromkeys(f"model.layers.{int(i) * blocks // source_blocks}.{rest}" for _, _, i, rest in mapped)
    ranking = [name for name in ranking if name in every]
    return ranking + [name for name in every if name not in ranking]


def prepared(model: LlamaForCausalLM, method: str, ranking: list[str]) -> tuple[torch.nn.Module, LayerSampler | None]:
    """(the model to train, a layerwise sampler or None) for `method`, from the frozen base `model`."""
    if method == "lisa":
        return model, LayerSampler(block_groups(model, ranking), LayerwiseConfig(**LISA))
    if method == "lora-all":
        return get_peft_model(model, LoraConfig(target_modules="all-linear", **ADAPTER)), None
    blocks = model.config.num_hidden_layers
    layers = None  # the probe state (probe-stage1, probe-stage2): adapters on every candidate
    if method in ("ila-25", "ila-75"):
        layers = ranking[: resolve_top_k(int(method[4:]) / 100, len(ranking))]
    if method == "last-25":  # the blocks of the last quarter
        layers = [name for name in ranking if int(name.split(".")[2]) >= blocks - max(1, blocks // 4)]
    return get_peft_model(model, ILAConfig(selected_layers=layers, **ADAPTER)), None


def trained(
    model: LlamaForCausalLM, method: str, ranking: list[str], batch: dict, steps: int, round_: int
) -> tuple[list[float], float]:
    """`train_briefly` of `method` on `model` for `steps` steps of one `batch` (stage 2: the probe's gates): its step
    seconds and memory rise (MB); `model` is left as it was."""
    wrapped, sampler = prepared(model, method, ranking)
    if method == "probe-stage2":  # ILA's stage 2 on the probe: only the gate logits train
        with wrapped.base_model.gate_stage() as bank:
            took = train_briefly(wrapped, [batch], steps, LR, params=[bank.logits])
    else:
        took = train_briefly(wrapped, [batch], steps, LR, sampler=sampler)
    base = wrapped.unload() if hasattr(wrapped, "unload") else wrapped  # `model` again, without adapters
    base.requires_grad_(False)
    return took


def measure(name: str, args: argparse.Namespace, ranking_source: list[str]) -> dict:
    """Every method on shape `name`, with and without gradient checkpointing, side by side."""
    shape, dtype = SHAPES[name], DTYPE[args.device.split(":")[0]]
    model = build(shape, args.device, dtype)
    ranking = carried_ranking(ranking_source, shape["blocks"])
    batch = {k: tensor.to(args.device) for k, tensor in random_batch(shape["vocab"], args.batch, args.length).items()}
    cuda, rows = args.device.startswith("cuda"), []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        runs = {method: partial(trained, model, method, ranking, batch, args.steps) for method in METHODS}
        for method, took in side_by_side(runs, args.rounds).items():
            step, peak = took["step_seconds"], took["memory_rise_mb"] if cuda else None  # no CUDA memory on a CPU
            row = {"method": method, "checkpointing": checkpointing, "step_seconds": step, "peak_mb": peak}
            rows.append({**row, "tokens_per_second": args.batch * args.length / step})
        model.gradient_checkpointing_disable()
    params = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()
    dtype = str(dtype).removeprefix("torch.")
    return {"shape": name, **shape, "parameters": params, "dtype": dtype, "rows": rows, "budget": projected(rows)}


def projected(rows: list[dict]) -> dict:
    """Identification's wall time at the library's default budget, projected from the timed stage steps (without
    gradient checkpointing)."""
    step = {r["method"]: r["step_seconds"] for r in rows if not r["checkpointing"]}
    defaults = ILAConfig()
    seconds = defaults.stage1_max_steps * step["probe-stage1"] + defaults.stage2_steps * step["probe-stage2"]
    budget = {"stage1": defaults.stage1_max_steps, "stage2": defaults.stage2_steps}
    return {**budget, "seconds": seconds, "lora_all_steps": seconds / step["lora-all"]}


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
        budget = shape["budget"]
        lines += [f"## {shape['shape']} ({shape['parameters']:,} parameters, {shape['dtype']})", ""]
        lines += [*columns(shape_columns(shape["rows"]), shape["rows"]), ""]
        lines += [
            f"Identification at the default budget ({budget['stage1']} + {budget['stage2']} steps), projected: "
            f"{budget['seconds']:.0f} s, {budget['lora_all_steps']:.0f} LoRA-all steps.",
            "",
        ]
    return "\n".join([*lines, *trainer_section(results.get("trainer"))]) + "\n"


def shape_columns(rows: list[dict]) -> list[Column]:
    """A shape's table: each method's step time, speed and memory, also in units of LoRA-all's (same checkpointing)."""
    lora = {r["checkpointing"]: r for r in rows if r["method"] == "lora-all"}

    def x_lora(row: dict, key: str) -> str:
        return number(ratio(row[key], lora[row["checkpointing"]][key]))

    def peak(row: dict) -> str:
        return "" if row["peak_mb"] is None else f"{row['peak_mb']:,.0f} ({x_lora(row, 'peak_mb')}x)"

    return [
        ("method", "l", lambda r: r["method"]),
        ("checkpointing", "l", lambda r: "yes" if r["checkpointing"] else "no"),
        ("s/step", "r", lambda r: f"{r['step_seconds']:.3f}"),
        ("x LoRA-all", "r", lambda r: x_lora(r, "step_seconds")),
        ("tokens/s", "r", lambda r: f"{r['tokens_per_second']:,.0f}"),
        ("peak MB above the model (x LoRA-all)", "r", peak),
    ]


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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"shape": shape, "error": done.stderr[-3000:]}
    return json.loads((out / "trainer.json").read_text())


if __name__ == "__main__":
    main()
