"""`peft-ila`: find the layers alignment needs on a real model and data, fine-tune only those, and ship the result."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .args import parser


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


def _accelerator(args):
    """Precision and accumulation; under torchrun/accelerate launch also the process group (gloo without a GPU)."""
    import torch
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=args.grad_accum,
    )


def _ila_config(args, **overrides):
    """The ILAConfig of the command's options; an invalid value is a usage error (checked before any loading)."""
    from ..config import ILAConfig
    from . import UsageError

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
    try:
        return ILAConfig(**{**fields, **overrides})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _prepare(args, accelerator):
    from transformers import set_seed

    from .pipeline import prepare

    set_seed(args.seed)  # adapter initialisation outside identification, dropout
    with accelerator.main_process_first():  # rank 0 fills the data and model caches, the others then read them
        return prepare(
            args.model,
            args.data,
            args.max_length,
            args.overlong,
            args.eval_size,
            args.seed,
            args.plain_format,
            accelerator,
            args.eval_data,
        )


def _config_record(config) -> dict:
    record = config.to_dict()
    record = {k: sorted(v) if isinstance(v, set) else v for k, v in record.items()}
    for key in ("selected_layers", "layer_scores", "peft_type", "auto_mapping", "base_model_name_or_path", "revision"):
        record.pop(key, None)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in record.items()}


def _checkpoint(args, out: Path) -> Path | None:
    """Where identification checkpoints to (None: it does not); checked before any work, like the output path."""
    from ..distributed import rank
    from . import UsageError

    path = out.with_name(out.name + ".checkpoint.safetensors")
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs checkpoints; drop --checkpoint-every 0.")
    if args.resume and not path.is_file():
        raise UsageError(f"--resume: {path} does not exist, there is nothing to resume; run without --resume.")
    if path.is_file() and not args.resume:
        if not args.overwrite:
            raise UsageError(
                f"{path} holds the state of an interrupted identification; pass --resume to continue it, or "
                "--overwrite to start over."
            )
        if rank() == 0:
            path.unlink()
    return path if args.checkpoint_every else None


def _identify(args, prepared, accelerator, out: Path, checkpoint: Path | None = None, shown: Path | None = None):
    """Stages 1 and 2 on the training split; the run directory appears whole at `out` or not at all. With a
    `checkpoint`, the run's state is saved there as it goes and removed once the run directory is written."""
    from ..distributed import rank
    from ..mask import ILALoadError
    from . import UsageError
    from .files import main_process_dir
    from .pipeline import identify
    from .report import write_run

    config = _ila_config(args)
    try:
        with main_process_dir(out, args.overwrite) as tmp:
            model, result = identify(
                prepared,
                config,
                args.batch_size,
                args.seed,
                accelerator,
                not args.no_progress,
                checkpoint,
                args.checkpoint_every,
                args.resume,
            )
            candidates = model.base_model.candidate_layers()
            info = {**prepared.info, "batch_size": args.batch_size}
            record = write_run(tmp, result, _config_record(config), candidates, info, _command(args))
    except ILALoadError as exc:  # the checkpoint to resume does not fit this command
        raise UsageError(str(exc)) from None
    except BaseException:
        if checkpoint is not None and checkpoint.is_file() and rank() == 0:
            print(
                f"peft-ila: identification's progress is saved in {checkpoint}; run the same command with --resume "
                "to continue it.",
                file=sys.stderr,
            )
        raise
    if checkpoint is not None and rank() == 0:
        checkpoint.unlink(missing_ok=True)
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

    from ..distributed import world_size
    from .files import main_process_dir, write_json

    settings = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "bf16", "lr", "warmup")}
    record = {"command": _command(args), **prepared.info, **settings, "processes": world_size()}
    record.update(selection=selection, **asdict(report))
    with main_process_dir(out, args.overwrite) as tmp:
        if tmp is not None:
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
    checkpoint = _checkpoint(args, args.out)
    _ila_config(args)
    accelerator = _accelerator(args)
    prepared = _prepare(args, accelerator)
    _, _, record = _identify(args, prepared, accelerator, args.out, checkpoint)
    _print_top(record)


def cmd_train(args) -> None:
    from . import UsageError
    from .files import check_free
    from .pipeline import finetune, lora_all_layers, wrap
    from .report import read_run

    inline = args.out.with_name(args.out.name + "-identify")  # where an inline identification writes its run
    check_free(args.out, args.overwrite)
    checkpoint = None
    if not (args.mask or args.all_layers or args.layers):
        check_free(inline, args.overwrite)
        checkpoint = _checkpoint(args, inline)
    elif args.resume:
        raise UsageError(
            "--resume continues an interrupted identification; with --mask, --all-layers or --layers "
            "there is none, drop --resume."
        )
    run = read_run(args.mask) if args.mask else None
    _ila_config(args)
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
        model, selection = wrap(prepared.model, config), f"mask {args.mask}"
    elif args.all_layers:
        model = lora_all_layers(prepared, args.r, args.lora_alpha, args.lora_dropout, args.target_modules)
        selection = "all layers (plain peft LoRA)"
    elif args.layers:
        model, selection = wrap(prepared.model, _ila_config(args, selected_layers=args.layers)), "--layers"
    else:
        model, _, record = _identify(args, prepared, accelerator, inline, checkpoint)
        _print_top(record)
        selection = f"identified inline ({inline})"
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
    from . import UsageError
    from .files import read_json, write_json
    from .pipeline import first_user_turn, generate, prepare

    info = read_json(args.adapter / "training.json")
    if not (args.adapter / "adapter_model.safetensors").is_file():
        raise UsageError(
            f"{args.adapter} has no adapter_model.safetensors; peft-ila loads weights only from safetensors. Save "
            "the adapter again with save_pretrained(dir)."
        )
    prepared = prepare(
        info["model"],
        info["data"],
        info["max_length"],
        info.get("overlong", "truncate"),
        info["held_out_examples"],
        info["split_seed"],
        info["format"] == "plain",
        eval_data=info.get("eval_data"),
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
    _ila_config(args)
    accelerator = _accelerator(args)
    with staged_dir(args.out, args.overwrite) as tmp:
        prepared = _prepare(args, accelerator)
        model, _, record = _identify(args, prepared, accelerator, tmp / "identify", shown=args.out / "identify")
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
        done = subprocess.run(reload, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"reloading the adapter in a fresh process failed:\n{done.stderr[-3000:]}")
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
    from .args import MULTI_PROCESS

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and args.command not in MULTI_PROCESS:
        print(
            f"peft-ila {args.command}: error: runs in one process; launch it without torchrun/accelerate launch "
            f"(only {' and '.join(MULTI_PROCESS)} use several).",
            file=sys.stderr,
        )
        return 2
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)

    handlers = {
        "identify": cmd_identify,
        "train": cmd_train,
        "compare": cmd_compare,
        "export-lora": cmd_export_lora,
        "eval": cmd_eval,
        "demo": cmd_demo,
    }
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM cleans up like Ctrl-C
    try:
        handlers[args.command](args)
    except UsageError as exc:
        print(f"peft-ila {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the loss diverged: the step and stage are in the message
        print(f"peft-ila {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"peft-ila {args.command}: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
