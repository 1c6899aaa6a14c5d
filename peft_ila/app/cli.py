"""`peft-ila`: find the layers alignment needs on a real model and data, fine-tune only those, and ship the result."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

from .args import parser
from .recipe import INSIDE
from .steps import (
    accelerator_for,
    candidates_of,
    checkpoint_path,
    finetune_checkpoint,
    identify_to_run,
    ila_config,
    loading_of,
    mask_config,
    prepare_data,
    print_finetune,
    print_top,
    save_adapter,
)


def offline_and_quiet() -> None:
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
    from . import UsageError
    from .files import check_free

    if args.keep_stage1_weights:
        raise UsageError(
            "--keep-stage1-weights makes identification the start of a fine-tune; a run directory keeps no "
            "weights: use it with `peft-ila train` (identifying inline), or drop it."
        )
    check_free(args.out, args.overwrite)
    checkpoint = checkpoint_path(args, args.out)
    ila_config(args)
    accelerator = accelerator_for(args)
    prepared = prepare_data(args, accelerator)
    _, _, record = identify_to_run(args, prepared, accelerator, args.out, checkpoint)
    print_top(record)


def cmd_train(args) -> None:
    from ..identification.distributed import rank
    from .files import check_free
    from .report import inline_run, read_run

    inline = inline_run(args.out)  # where an inline identification writes its run
    identifying = _train_defaults(args)
    check_free(args.out, args.overwrite)
    saved = finetune_checkpoint(args, identifying)  # the fine-tune's checkpoint, or None
    checkpoint = None  # the inline identification's, unless the fine-tune after it resumes
    if identifying and not (saved is not None and saved.resume):
        check_free(inline, args.overwrite)
        checkpoint = checkpoint_path(args, inline)
    _check_selection_options(args)
    _check_method(args)
    run = read_run(args.mask) if args.mask else None  # (record, selection)
    ila_config(args)
    accelerator = accelerator_for(args)
    prepared = prepare_data(args, accelerator)
    built = _built(args, prepared, accelerator, run, (inline, checkpoint, saved))
    sampler = _layerwise(args, built.model, built.scored)
    if saved is not None and built.base is not None:  # what a resumed fine-tune needs from before identification
        saved = dataclasses.replace(saved, notes={"base_loss": built.base})
    report = _finetune(args, built.model, prepared, accelerator, built.params, sampler, built.skip, saved)
    how = {"method": args.method, **({"changed_only": True} if args.changed_only else {})}
    if sampler is not None:
        how["layerwise"] = {**dataclasses.asdict(sampler.config), "blocks": len(sampler.groups)}
    report = _from_base(report, built.base, how)
    full = built.chosen if args.method == "full" else None
    save_adapter(args, built.model, args.out, report, prepared, {**built.selection, **how}, full)
    if saved is not None and rank() == 0:
        saved.path.unlink(missing_ok=True)
    print_finetune(report)
    print(_saved_line(args, full is not None))


def _train_defaults(args) -> bool:
    """Whether `train` identifies inline (no --mask, --all-layers or --layers); if so, its defaults are
    identification inside the fine-tune (`recipe.INSIDE`): the stage-1 weights kept and the top 75%."""
    identifying = not (args.mask or args.all_layers or args.layers)
    if args.keep_stage1_weights is None:
        args.keep_stage1_weights = identifying
    if identifying and args.top_k is None:
        args.top_k = INSIDE["top_k"]
    return identifying


@dataclasses.dataclass
class _Built:
    """What `train` fine-tunes: the model, the parameters to train (None: the trainable ones), the layers they are on
    (a `Selection`, or None), the selection as training.json records it, the run record whose scores weigh
    --layerwise-importance, the base model's held-out loss when identification starts the fine-tune, and the
    micro-batches of the data order already trained on."""

    model: object
    params: list | None
    chosen: object
    selection: dict
    scored: dict | None = None
    base: float | None = None
    skip: int = 0


def _built(args, prepared, accelerator, run, inline_state) -> _Built:
    """The model `train` fine-tunes, from a --mask `run`, --all-layers, --layers, or an inline identification
    (`inline_state`: its run directory, its checkpoint, the fine-tune's checkpoint)."""
    from .pipeline import lora_all_layers

    if run is not None:
        config, chosen, selection = mask_config(args, *run, args.mask, prepared)
        built = _Built(*_put_method(args, prepared.model, config, chosen), selection, scored=run[0])
    elif args.all_layers and args.method == "ila":
        model = lora_all_layers(prepared, args.r, args.lora_alpha, args.lora_dropout, args.target_modules)
        layers = len(model.base_model.targeted_module_names)
        built = _Built(model, None, None, {"selection": "all layers (plain peft LoRA)", "layers": layers})
    elif args.all_layers or args.layers:
        chosen = _listed(args, prepared.model, prepared.info["model"])
        config = ila_config(args, selected_layers=list(chosen.selected))
        name = "--all-layers" if args.all_layers else "--layers"
        built = _Built(*_put_method(args, prepared.model, config, chosen), {"selection": name})
        built.selection["layers"] = len(built.chosen.selected)
    else:
        inline = inline_state[0]
        model, scored, base = _identify_inline(args, prepared, accelerator, *inline_state)
        top_k = model.peft_config["default"].top_k
        selection = {"selection": f"identified inline ({inline})", "top_k": top_k, "layers": len(scored["selected"])}
        built = _Built(model, None, None, selection, scored, base, _stage1_batches(args, scored))
    if args.within_lora_params:  # the layers a full fine-tune sized to LoRA-all's parameters kept
        built.selection.update(layers=len(built.chosen.selected), within_lora_params=True)
    return built


def _saved_line(args, full: bool) -> str:
    """Where `train` saved what, and how it loads."""
    if full and args.changed_only:
        return f"changed weights saved to {args.out} (onto the base: peft_ila.load_changed_weights(model, dir))"
    if full:
        return f"model saved to {args.out} (AutoModelForCausalLM.from_pretrained; its mask: peft_ila.load_selection)"
    if args.all_layers and args.method == "ila":
        return f"adapter saved to {args.out} (plain peft LoRA: PeftModel.from_pretrained, no peft-ila needed)"
    return f"adapter saved to {args.out} (load with PeftModel.from_pretrained after `import peft_ila`)"


def _check_selection_options(args) -> None:
    """Refuse the options that need a way of choosing layers the command does not take."""
    from . import UsageError

    if args.top_k is not None and (args.all_layers or args.layers):
        raise UsageError(
            "--top-k takes the best layers of a ranking (from identification or a --mask); --layers and "
            "--all-layers have none, drop --top-k."
        )
    if args.budget is not None and (args.mask or args.all_layers or args.layers):
        raise UsageError(
            "--budget chooses layers while identifying them; with --mask, --all-layers or --layers nothing is "
            "identified: drop --budget, or identify with --budget and pass that run as --mask."
        )
    if args.keep_stage1_weights and (args.mask or args.all_layers or args.layers):
        raise UsageError(
            "--keep-stage1-weights continues from the adapters an inline identification trained; with --mask, "
            "--all-layers or --layers nothing is identified: drop it, or leave those out to identify inline."
        )
    if args.allow_other_model and not args.mask:
        raise UsageError("--allow-other-model applies to a --mask found on another model; drop it.")


def _identify_inline(args, prepared, accelerator, inline: Path, checkpoint: Path | None, saved):
    """(model, run record, the base model's held-out loss or None) of identification inside `train`: run into
    `inline` (checkpointing to `checkpoint`), or, when the fine-tune after it resumes (`saved`), rebuilt from the run
    directory it wrote, the base loss read back from the fine-tune's checkpoint."""
    from ..identification.checkpoint import checkpoint_record

    if saved is not None and saved.resume:
        model, record = _identified(args, prepared, inline)
        return model, record, checkpoint_record(saved.path)["notes"].get("base_loss")
    base = _base_loss(args, prepared, accelerator)
    model, _, record = identify_to_run(args, prepared, accelerator, inline, checkpoint)
    print_top(record)
    return model, record, base


def _base_loss(args, prepared, accelerator) -> float | None:
    """The base model's held-out loss, measured before an identification whose stage-1 weights the fine-tune keeps
    (`--keep-stage1-weights`) changes the model; None otherwise (the fine-tune measures its own "before")."""
    from ..identification.training import evaluate_loss

    if not args.keep_stage1_weights:
        return None
    held_out = prepared.batches(args.batch_size, args.seed, held_out=True)
    return evaluate_loss(prepared.model, held_out, accelerator, not args.no_progress)


def _from_base(report, base: float | None, record: dict):
    """`report`, its "before" the base model's loss when the fine-tune began with identification (`base`); the loss
    the model had after identification goes into `record` (`loss_after_identification`)."""
    if base is None:
        return report
    record["loss_after_identification"] = report.loss_before
    return dataclasses.replace(report, loss_before=base)


def _trained(args, record: dict) -> str:
    """What the fine-tune after an inline identification (`record`) trained, in words."""
    layers = f"the top {len(record['selected'])} layers"
    if not args.keep_stage1_weights:
        return f"fine-tuning {layers};"
    return f"identification's {record['costs']['stage1']['steps']} steps on every layer, then {args.steps} on {layers};"


def _stage1_batches(args, record: dict) -> int:
    """Micro-batches of the data order an inline identification's stage 1 read (as its run `record` has them), when
    the fine-tune goes on from its weights (`--keep-stage1-weights`) and so with the data after them; else 0 (the
    fine-tune starts afresh)."""
    return record["costs"]["stage1"]["micro_batches"] if args.keep_stage1_weights else 0


def _finetune(args, model, prepared, accelerator, params=None, sampler=None, skip=0, checkpoint=None):
    """`pipeline.finetune` with the command's options (`params`: what trains, default the trainable parameters;
    `sampler`: sampled layerwise training; `skip`: micro-batches of the data order already trained on; `checkpoint`:
    a `FinetuneCheckpoint`, whose file is named on an interruption)."""
    from ..identification.checkpoint import checkpoint_record
    from ..identification.distributed import rank
    from ..tuner.selection import ILALoadError
    from . import UsageError
    from .pipeline import finetune

    progress = not args.no_progress
    steps = (args.steps, args.lr, args.batch_size, args.seed, args.warmup)
    try:
        return finetune(
            model, prepared, *steps, accelerator, progress, params, sampler=sampler, skip=skip, checkpoint=checkpoint
        )
    except ILALoadError as exc:  # the checkpoint to resume does not fit this command
        raise UsageError(str(exc)) from None
    except BaseException:
        saved = checkpoint_record(checkpoint.path) if checkpoint is not None and rank() == 0 else None
        if saved is not None:
            print(
                f"peft-ila: the fine-tune's progress ({saved['stats']['steps']} of {args.steps} steps) is saved in "
                f"{checkpoint.path}; run the same command with --resume to continue it.",
                file=sys.stderr,
            )
        raise


def _identified(args, prepared, inline: Path):
    """(model, record) of an inline identification already written to `inline`: the selected layers' adapters on
    the prepared model, as the identification left them (their weights come from the fine-tune's checkpoint)."""
    from .pipeline import wrap
    from .report import read_run

    record, selection = read_run(inline)
    shape = {key: record["config"][key] for key in ("target_modules", "granularity", "top_k")}
    print(f"run directory {inline} (written before the interruption): {len(selection.selected)} layers selected")
    return wrap(prepared.model, ila_config(args, **selection.config_fields(), **shape)), record


def _layerwise(args, model, scored: dict | None):
    """The `LayerSampler` of `--layerwise` over the blocks of what trains in `model` (None without the option);
    `--layerwise-importance` weighs the draws by the layer scores of `scored` (the `--mask` run's record, or the
    inline identification's)."""
    from ..tuner.layerwise import LayerSampler, LayerwiseConfig, block_importance, trainable_blocks
    from . import UsageError
    from .args import usage_error

    if args.layerwise is None:
        return None
    if args.method == "adalora":
        raise UsageError("--layerwise cannot drive AdaLoRA, whose rank budget steps every adapter: use another method.")
    if args.layerwise_importance > 0 and scored is None:
        raise UsageError(
            "--layerwise-importance weighs the draws by a mask's scores: pass --mask RUN_DIR (or identify inline)."
        )
    try:
        config = LayerwiseConfig(
            args.layerwise, args.layerwise_interval, args.layerwise_importance, args.layerwise_temperature, args.seed
        )
        groups = trainable_blocks(model)
        importance = None
        if scored is not None:
            scores = block_importance(scored["scores"])
            importance = {name: scores.get(name, 0.0) for name in groups}
        return LayerSampler(groups, config, importance)
    except ValueError as exc:
        raise usage_error(exc) from None


def _check_method(args) -> None:
    """`--method` other than ILA's own needs a selection; qlora loads the base in 4 bits (implied)."""
    from . import UsageError

    if args.method != "ila" and not (args.mask or args.layers or args.all_layers):
        raise UsageError(
            f"--method {args.method} puts {args.method} on a selection of layers: pass --mask RUN_DIR, --layers, or "
            "--all-layers for every candidate."
        )
    if args.within_lora_params and args.method != "full":
        raise UsageError(
            f"--within-lora-params sizes a full fine-tune of the selection; --method {args.method} trains adapters: "
            "drop it (or use --method full)."
        )
    if args.within_lora_params and not args.mask:
        raise UsageError(
            "--within-lora-params keeps the best layers of a mask's ranking that fit LoRA-all's parameters: pass "
            "--mask RUN_DIR (--layers and --all-layers rank nothing)."
        )
    if args.changed_only and args.method != "full":
        raise UsageError(
            f"--changed-only saves the weights a full fine-tune changed; --method {args.method} saves an adapter, "
            "which holds only what it trains already: drop --changed-only (or use --method full)."
        )
    if args.method == "full" and args.quantize:
        raise UsageError(
            f"--method full trains the selected weights themselves, which a --load-in-{args.quantize} base stores "
            "quantized; drop the option (or use --method qlora)."
        )
    if args.method == "qlora":
        if args.quantize == "8bit":
            raise UsageError("--method qlora is LoRA on a 4-bit base; drop --load-in-8bit (or use --method lora).")
        args.quantize = "4bit"


def _put_method(args, base, config, chosen):
    """(model, the parameters to train or None for all trainable ones, the layers they are on) for `--method` on the
    selection `chosen`: ILA's adapters (`config`), another peft method on exactly those layers, or the layers' own
    weights (full; with --within-lora-params the best of `chosen`'s ranking that fit LoRA-all's parameter count)."""
    from ..tuner.full import lora_parameter_count, top_within_parameters, train_only_selected
    from .args import usage_error
    from .pipeline import method_config, wrap

    if args.method == "full":
        try:
            if args.within_lora_params:
                budget = lora_parameter_count(base, chosen.candidates, args.r)
                chosen = top_within_parameters(base, chosen, budget)
                print(f"--within-lora-params: the best {len(chosen.selected)} layers within {budget:,} parameters")
            return base, train_only_selected(base, chosen), chosen
        except ValueError as exc:
            raise usage_error(exc) from None
    if args.method == "ila":
        return wrap(base, config), None, chosen
    if config.granularity == "block":  # another method adapts modules: those ILA's adapters sit on in the blocks
        chosen = _modules_in_blocks(base, config, chosen)
    config = method_config(args.method, chosen, args.r, args.lora_alpha, args.lora_dropout, args.steps)
    return wrap(base, config), None, chosen


def _modules_in_blocks(base, config, blocks):
    """The module-level `Selection` of the candidate modules of `config` (its target modules) inside the blocks
    `blocks` selects."""
    from dataclasses import replace

    from ..tuner.selection import Selection, layer_of

    modules = candidates_of(base, replace(config, granularity="module", selected_layers=None))
    chosen = set(blocks.selected)
    return Selection(tuple(modules), tuple(m for m in modules if layer_of(m, "block") in chosen))


def _listed(args, base, model: str):
    """The `Selection` of `--layers` (checked against `base`'s candidates), or of every candidate (`--all-layers`)."""
    from ..tuner.selection import Selection

    candidates = candidates_of(base, ila_config(args))
    if not args.all_layers:
        _check_layers(args, candidates, model)
    return Selection(tuple(candidates), tuple(candidates if args.all_layers else args.layers))


def _check_layers(args, candidates: list[str], model: str) -> None:
    from . import UsageError

    missing = [name for name in args.layers if name not in set(candidates)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UsageError(
            f"--layers names {len(missing)} layer(s) that are not candidates of {model} with --target-modules "
            f"{args.target_modules if isinstance(args.target_modules, str) else ','.join(args.target_modules)} "
            f"and --granularity {args.granularity}: {shown}. Its candidates are {candidates[0]}, ... "
            f"({len(candidates)} in all; a run directory's importance.json lists them)."
        )


def cmd_compare(args) -> None:
    from .compare import compare

    print(compare(args.runs, args.out, args.overwrite, args.label))


def cmd_export_lora(args) -> None:
    from .export import export_lora

    modules = export_lora(args.adapter, args.out, args.overwrite)
    print(
        f"wrote a plain LoRA adapter on {len(modules)} modules to {args.out}; vanilla peft loads it with "
        "PeftModel.from_pretrained(base, dir), no peft-ila needed"
    )


def cmd_eval(args) -> dict:
    from ..identification.training import evaluate_loss
    from .files import read_json, write_json
    from .pipeline import first_user_turn, generate

    info = read_json(args.adapter / "training.json", "an adapter written by `peft-ila train` or `demo`")
    changed_only = bool(info.get("changed_only"))  # the tensors a full fine-tune changed, put back into its base
    full = info.get("method") == "full" and not changed_only  # a model directory of its own, not an adapter
    prepared, recorded = _eval_prepared(args, info, full, changed_only)
    model = _evaluated_model(args, prepared.model, full, changed_only)
    held_out = prepared.batches(info.get("batch_size", 4), info["split_seed"], held_out=True)
    result = {
        "adapter": str(args.adapter.resolve()),
        "held_out_loss": evaluate_loss(model, held_out, progress=not args.no_progress),
        "prompt": first_user_turn(prepared.held_out_conversations[0]),
        "generation": generate(model, prepared.tokenizer, prepared.held_out_conversations[0], prepared.plain),
    }
    before, after = info.get("loss_before"), info.get("loss_after")
    if recorded and before is not None and after is not None:  # the same held-out examples as at training
        result["recorded"] = {"loss_before": before, "loss_after": after}
        then = f" (recorded when trained: {before:.4f} for the base model -> {after:.4f})"
    else:
        then = ""
    print(f"held-out loss of {args.adapter}: {result['held_out_loss']:.4f}{then}")
    print(f"generation: {result['generation']!r}")
    if args.json:
        write_json(args.json, result)
    return result


def _eval_prepared(args, info: dict, full: bool, changed_only: bool):
    """(prepared, whether its held-out examples are the recorded ones) for `eval`: the base model (or a full
    fine-tune's own) and the held-out split `info` (training.json) records, checked against what it records."""
    from . import UsageError
    from .pipeline import prepare

    if full and args.model:
        raise UsageError(f"{args.adapter} is a full fine-tune, a model of its own (--method full); drop --model.")
    if not (full or changed_only) and not (args.adapter / "adapter_model.safetensors").is_file():
        raise UsageError(
            f"{args.adapter} has no adapter_model.safetensors; peft-ila loads weights only from safetensors. Save "
            "the adapter again with save_pretrained(dir)."
        )
    source, columns, recorded = _held_out_source(args, info)
    prepared = prepare(
        str(args.adapter) if full else args.model or info["model"],
        source,
        info["max_length"],
        info.get("overlong", "truncate"),
        info["held_out_examples"],
        info["split_seed"],
        info["format"] == "plain",
        accelerator=accelerator_for(args),
        columns=columns,
        quantize=info.get("quantization"),
        loading=loading_of(args, info.get("loading")),
    )
    if not full:  # a full fine-tune's weights are its own, not its base model's
        _check_base_model(args, info, prepared.info["base_model"])
    if recorded and prepared.info["held_out_ids"] != info.get("held_out_ids", prepared.info["held_out_ids"]):
        print(
            f"warning: the held-out examples differ from those recorded in {args.adapter}/training.json (another "
            "tokenizer or chat template?); the loss is not comparable to the recorded one.",
            file=sys.stderr,
        )
    return prepared, recorded


def _evaluated_model(args, base, full: bool, changed_only: bool):
    """What `eval` evaluates: a full fine-tune's own model (`base`), the base with the changed weights put back, or
    the adapter loaded onto it."""
    from peft import PeftModel

    from ..tuner.full import load_changed_weights
    from ..tuner.selection import ILALoadError
    from . import UsageError

    try:
        if changed_only:
            load_changed_weights(base, args.adapter)
        return base if full or changed_only else PeftModel.from_pretrained(base, args.adapter)
    except (ILALoadError, ValueError) as exc:  # an adapter or changed weights of another base
        raise UsageError(str(exc)) from None


def _held_out_source(args, info: dict) -> tuple[str, dict | None, bool]:
    """Where `eval` draws the held-out examples from, its column mapping, and whether it is the recorded data: the
    file recorded in training.json (checked against its SHA-256: a changed file is refused), or the --data or
    --eval-data given (with a warning when its content is not the recorded one)."""
    from . import UsageError
    from .data import ALPACA_DEMO, fetch_alpaca_demo, fingerprint

    flag = "--eval-data" if info.get("eval_data") else "--data"
    recorded = info.get("eval_data") or info["data"]
    sha = info.get("eval_data_sha256") if info.get("eval_data") else info.get("data_sha256")
    columns = info.get("eval_columns") if info.get("eval_data") else info.get("columns")
    if args.data and info.get("eval_data") and not args.eval_data:
        raise UsageError(
            f"the held-out examples of {args.adapter} come from the separate file {recorded}, not from --data; pass "
            "--eval-data to draw them from another file."
        )
    given = args.eval_data or args.data
    if given is None and recorded != ALPACA_DEMO and Path(recorded).is_absolute() and not Path(recorded).exists():
        raise UsageError(
            f"{recorded}, the {flag} recorded in {args.adapter}/training.json, is not there any more; pass {flag} "
            "with its new place."
        )
    source, now = fingerprint(given or recorded)
    if sha is None:
        print(f"note: {args.adapter}/training.json records no SHA-256 of its data (an older adapter): not checked")
        return source, None, False
    if now == sha:
        if source != recorded:
            print(f"note: {source} has the content of the recorded {flag} {recorded} (sha256 {sha[:12]})")
        return source, columns, True
    if given is None:
        where = f" ({fetch_alpaca_demo()})" if source == ALPACA_DEMO else ""
        raise UsageError(
            f"{source}{where} has changed since {args.adapter} was trained (sha256 {sha[:12]} recorded, {now[:12]} "
            f"now): its held-out examples and loss would not be the recorded ones. Restore it, or pass {flag} "
            f"{source} to evaluate on it anyway."
        )
    print(
        f"warning: evaluating on {source} (sha256 {now[:12]}), not on the {flag} {args.adapter} was trained and "
        f"evaluated on, {recorded} (sha256 {sha[:12]}): {info['held_out_examples']} held-out examples are drawn "
        f"from it with seed {info['split_seed']}; the loss is not comparable to the recorded one.",
        file=sys.stderr,
    )
    return source, None, False


def _check_base_model(args, info: dict, loaded: dict) -> None:
    """The base model's weights must be those the adapter was trained on: refused if they changed under the
    recorded name, a warning if another model was given with --model."""
    from ..tuner.selection import same_weights
    from . import UsageError

    recorded = info.get("base_model")
    if recorded is None or same_weights(recorded, loaded) is not False:
        return
    other = f"{loaded['model']} (weights {loaded['weights_sha256'][:12]})"
    was = f"{recorded['model']} (weights {recorded['weights_sha256'][:12]})"
    if args.model is None:
        raise UsageError(
            f"the base model {other} is not the one {args.adapter} was trained on, {was}; restore it, or pass "
            f"--model {loaded['model']} to evaluate on it anyway."
        )
    print(f"warning: evaluating on the base model {other}, not on {was}; the loss is not comparable.", file=sys.stderr)


def cmd_demo(args) -> None:
    from .files import check_free, staged_dir, write_json
    from .pipeline import first_user_turn, generate
    from .report import machine

    started = time.perf_counter()
    check_free(args.out, args.overwrite)
    ila_config(args)
    accelerator = accelerator_for(args)
    with staged_dir(args.out, args.overwrite, "a demo directory") as tmp:
        prepared = prepare_data(args, accelerator)
        conversation = prepared.held_out_conversations[0]
        before_text = generate(prepared.model, prepared.tokenizer, conversation, prepared.plain)
        base = _base_loss(args, prepared, accelerator)
        model, _, record = identify_to_run(args, prepared, accelerator, tmp / "identify", shown=args.out / "identify")
        print_top(record)
        report = _finetune(args, model, prepared, accelerator, skip=_stage1_batches(args, record))
        selection = {"selection": "ILA top-k found by this demo", "top_k": model.peft_config["default"].top_k}
        selection.update(layers=len(record["selected"]))
        report = _from_base(report, base, selection)
        print_finetune(report)
        after_text = generate(model, prepared.tokenizer, conversation, prepared.plain)
        save_adapter(args, model, tmp / "adapter", report, prepared, selection)
        print("reloading the saved adapter in a fresh process ...")
        reloaded = _reload_in_a_fresh_process(tmp, args.out)
        summary = {
            "held_out_loss_before": report.loss_before,
            "loss_after_identification": selection.get("loss_after_identification"),  # None: adapters afresh
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
    print(_demo_text(args, summary, record))


def _demo_text(args, summary: dict, record: dict) -> str:
    """What `demo` prints at the end, from its demo.json `summary` and its identification's run `record`."""
    before, after, reload = (summary[f"held_out_loss_{key}"] for key in ("before", "after", "after_reload"))
    return textwrap.dedent(f"""
        ==== peft-ila demo ({summary["seconds"]:.0f} s) ====
        held-out loss: {before:.4f} before -> {after:.4f} after {_trained(args, record)}
        {reload:.4f} after reloading in a fresh process
        prompt: {summary["prompt"]!r}
        before: {summary["generation_before"]!r}
        after:  {summary["generation_after"]!r}
        reload: {summary["generation_after_reload"]!r}
        files:  {args.out}/identify (run directory), {args.out}/adapter (PEFT adapter), {args.out}/demo.json
    """)


def cmd_versus(args) -> None:
    from .versus import run_versus

    results = run_versus(args)
    if results is not None:
        print(f"{results['answer']}\nwritten: {args.out}/VERSUS.md, versus.json, versus.png")


def _reload_in_a_fresh_process(tmp: Path, out: Path) -> dict:
    """`peft-ila eval` of the demo's adapter (staged in `tmp`) in a new process: what it wrote to reload.json, which
    names the adapter where it will be once the demo's output `out` is in place."""
    from .files import write_json

    reload = [sys.executable, "-m", "peft_ila.app.cli", "eval", str(tmp / "adapter")]
    done = subprocess.run(
        [*reload, "--json", str(tmp / "reload.json"), "--no-progress"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"reloading the adapter in a fresh process failed:\n{done.stderr[-3000:]}")
    reloaded = json.loads((tmp / "reload.json").read_text())
    reloaded["adapter"] = str((out / "adapter").resolve())
    write_json(tmp / "reload.json", reloaded)
    return reloaded


def _check_optional_packages(args) -> None:
    """Refuse, before any work, a command whose output needs a package of the `app` extra that is missing."""
    from . import UsageError

    plots = args.command in ("identify", "demo", "compare", "versus") or (
        args.command == "train" and not (args.mask or args.all_layers or args.layers)
    )
    try:
        if plots:
            import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            f"peft-ila {args.command} needs matplotlib for its plots, which a plain `pip install peft-ila` lacks: "
            "pip install 'peft-ila[app]'."
        ) from None


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        # peft 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    offline_and_quiet()
    from ..tuner.selection import FieldError
    from . import UsageError
    from .args import MULTI_PROCESS, CommandLineError, usage_error

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
    except CommandLineError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv

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
        "versus": cmd_versus,
    }
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM cleans up like Ctrl-C
    try:
        _check_optional_packages(args)
        handlers[args.command](args)
    except (UsageError, FieldError) as exc:  # a field the library names is said as the option that sets it
        print(f"peft-ila {args.command}: error: {usage_error(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the loss diverged: the step and stage are in the message
        print(f"peft-ila {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"peft-ila {args.command}: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Destroy the process group of a multi-process launch before the interpreter exits: left alive, gloo's threads
    can abort the process while it shuts down ("terminate called without an active exception", exit status -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
