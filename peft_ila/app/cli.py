"""`peft-ila`: find the layers alignment needs on a real model and data, fine-tune only those, and ship the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from .args import parser
from .steps import (
    accelerator_for,
    checkpoint_path,
    identify_to_run,
    ila_config,
    prepare_data,
    print_finetune,
    print_top,
    save_adapter,
)


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


def cmd_identify(args) -> None:
    from .files import check_free

    check_free(args.out, args.overwrite)
    checkpoint = checkpoint_path(args, args.out)
    ila_config(args)
    accelerator = accelerator_for(args)
    prepared = prepare_data(args, accelerator)
    _, _, record = identify_to_run(args, prepared, accelerator, args.out, checkpoint)
    print_top(record)


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
        checkpoint = checkpoint_path(args, inline)
    elif args.resume:
        raise UsageError(
            "--resume continues an interrupted identification; with --mask, --all-layers or --layers "
            "there is none, drop --resume."
        )
    run = read_run(args.mask) if args.mask else None
    ila_config(args)
    accelerator = accelerator_for(args)
    prepared = prepare_data(args, accelerator)
    if run is not None:
        if run.get("model") != args.model:
            print(f"note: the mask was found on {run.get('model')}, fine-tuning {args.model}")
        config = ila_config(
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
        model, selection = wrap(prepared.model, ila_config(args, selected_layers=args.layers)), "--layers"
    else:
        model, _, record = identify_to_run(args, prepared, accelerator, inline, checkpoint)
        print_top(record)
        selection = f"identified inline ({inline})"
    report = finetune(
        model, prepared, args.steps, args.lr, args.batch_size, args.seed, args.warmup, accelerator, not args.no_progress
    )
    save_adapter(args, model, args.out, report, prepared, selection)
    print_finetune(report)
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
    ila_config(args)
    accelerator = accelerator_for(args)
    with staged_dir(args.out, args.overwrite) as tmp:
        prepared = prepare_data(args, accelerator)
        model, _, record = identify_to_run(args, prepared, accelerator, tmp / "identify", shown=args.out / "identify")
        print_top(record)
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
        print_finetune(report)
        after_text = generate(model, prepared.tokenizer, conversation, prepared.plain)
        save_adapter(args, model, tmp / "adapter", report, prepared, "ILA top-k found by this demo")
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
