"""What `identify`, `train`, `demo` and the benchmarks share: prepare model and data, find the layers, fine-tune,
evaluate, generate. Training always goes through `peft_ila.identification.training.train_steps`."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from transformers import get_linear_schedule_with_warmup

from ..identification.checkpoint import DataPosition
from ..identification.distributed import rank, world_size
from ..identification.importance import ILAResult, identify_important_layers
from ..identification.training import StepStats, cycle, evaluate_loss, train_steps
from ..tuner.config import ILAConfig
from ..tuner.layerwise import LayerSampler
from ..tuner.selection import FieldError, Selection, model_identity
from .checkpoints import FinetuneCheckpoint, FinetuneState
from .data import Conversation, Dataset, Encoded, batches, dropped_text, encode, prompt_text, read_dataset, split
from .files import peak_memory_mb, reset_peak_memory
from .models import Loading, load_model, portable


@dataclass
class Prepared:
    """A loaded model and tokenizer with tokenized, split data."""

    model: torch.nn.Module
    tokenizer: object
    info: dict  # model and data specs, counts, lengths: recorded in every report
    train: list
    held_out: list
    held_out_conversations: list[Conversation] = field(default_factory=list)
    plain: bool = False

    def batches(self, batch_size: int, seed: int, held_out: bool = False):
        """Padded batches of the training (shuffled) or held-out examples; under several processes, of this rank's
        share of them (every n-th example)."""
        data = (self.held_out if held_out else self.train)[rank() :: world_size()]
        if not held_out and not data:
            problem = f"gives {len(self.train)} training examples, too few to feed {world_size()} processes; use more "
            raise FieldError("data", problem + "data or fewer processes.", owner="prepare")
        return batches(data, batch_size, self.tokenizer.pad_token_id, shuffle=not held_out, seed=seed)


def prepare(
    model_spec: str,
    data_spec: str,
    max_length: int = 256,
    overlong: str = "truncate",
    eval_size: int | None = None,
    seed: int = 0,
    plain: bool = False,
    accelerator: Accelerator | None = None,
    eval_data: str | None = None,
    columns: dict[str, str] | None = None,
    quantize: str | None = None,
    loading: Loading | None = None,
) -> Prepared:
    """Load data first (cheap, and where most mistakes are), then the model; tokenize and split.

    The held-out set is `eval_size` examples (default `default_eval_size`): split off `data_spec` with `seed`, or
    drawn with `seed` from `eval_data` (a separate test file, then all of `data_spec` trains). `columns` maps roles
    to columns (see `data.column_mapping`). `quantize` ("4bit", "8bit"): the base model's linear layers stored by
    bitsandbytes (`models.load_model`); `loading`: the base weights' dtype and gradient checkpointing (default: as
    stored, none). `info` records what resolves from any directory (absolute paths), how the model was loaded, the
    SHA-256 of the data and the base model's identity, and the held-out rows (`held_out_ids`, row numbers in the
    file they come from)."""
    dataset = read_dataset(data_spec, columns)
    test_set = read_dataset(eval_data, columns) if eval_data else None
    model, tokenizer, loaded = load_base(model_spec, quantize, accelerator, loading)
    base_model = {"model": portable(model_spec), **model_identity(model)}
    plain = plain or not tokenizer.chat_template
    encoded = _encode_checked(dataset.conversations, "data", data_spec, tokenizer, max_length, overlong, plain)
    if test_set is not None:
        test = _encode_checked(test_set.conversations, "eval_data", eval_data, tokenizer, max_length, overlong, plain)
    if eval_size is None:
        eval_size = default_eval_size(len((encoded if test_set is None else test).examples))
    if test_set is None:
        train, held_out = split(list(range(len(encoded.examples))), eval_size, seed)
        test, test_set = encoded, dataset
    else:
        train, (_, held_out) = (
            list(range(len(encoded.examples))),
            split(list(range(len(test.examples))), eval_size, seed),
        )
    info = {
        "model": base_model["model"],
        "quantization": quantize,
        "loading": loaded,
        "data": dataset.source,
        "data_sha256": dataset.sha256,
        "columns": dataset.columns,
        "eval_data": test_set.source if eval_data else None,
        "eval_data_sha256": test_set.sha256 if eval_data else None,
        "eval_columns": test_set.columns if eval_data else None,
        "format": "plain" if plain else "chat template",
        "rows": dataset.rows,
        "rows_dropped": dataset.dropped,
        "conversations": len(dataset.conversations),
        "template_refused": encoded.refused,
        "examples": len(encoded.examples),
        "truncated": encoded.truncated,
        "dropped": encoded.dropped,
        "max_length": max_length,
        "overlong": overlong,
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "split_seed": seed,
        "held_out_ids": [test_set.row_ids[test.sources[i]] for i in held_out],
        "base_model": base_model,
    }
    print(_data_lines(data_spec, dataset, encoded, info, mapped=columns is not None))
    return Prepared(
        model=model,
        tokenizer=tokenizer,
        info=info,
        train=[encoded.examples[i] for i in train],
        held_out=[test.examples[i] for i in held_out],
        held_out_conversations=[test_set.conversations[test.sources[i]] for i in held_out],
        plain=plain,
    )


def load_base(
    model_spec: str, quantize: str | None = None, accelerator: Accelerator | None = None, loading: Loading | None = None
) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, how it was loaded) of `model_spec` on the accelerator's device (see `models.load_model`;
    `loading`: dtype and gradient checkpointing, default as stored and none)."""
    loading = loading or Loading()
    device = accelerator.device if accelerator is not None else "cpu"
    model, tokenizer = load_model(model_spec, quantize, device, loading.dtype)
    if accelerator is not None and quantize is None:  # a quantized model was loaded onto its device
        model.to(accelerator.device)
    return model, tokenizer, loading.apply(model)


def _data_lines(spec: str, dataset: Dataset, encoded: Encoded, info: dict, mapped: bool) -> str:
    """The data line (rows, conversations, examples and what was dropped or truncated, and why; the split) and the
    columns line (the mapping, `mapped` by --columns or detected, and the columns no role reads)."""
    refused = f"; {dropped_text(encoded.refused)}" if encoded.refused else ""
    test = f" from {info['eval_data']}" if info["eval_data"] else ""
    columns = ", ".join(f"{k}={v}" for k, v in dataset.columns.items())
    chosen = dataset.columns.get("output") == "chosen"
    return (
        f"data {spec}: {dataset.describe()} -> {len(encoded.examples)} examples ({encoded.truncated} truncated, "
        f"{encoded.dropped} dropped at max length {info['max_length']}{refused}); {info['train_examples']} train, "
        f"{info['held_out_examples']} held out{test} (seed {info['split_seed']}); format: {info['format']}\n"
        f"columns: {columns}"
        + ("" if mapped else " (detected; set them with --columns ROLE=COLUMN,...)")
        + ("; preference rows: the chosen answer is trained on" if chosen else "")
        + (f"; not read: {', '.join(dataset.unused)}" if dataset.unused else "")
    )


def default_eval_size(examples: int) -> int:
    """Held-out examples when none are asked for: a tenth of the `examples`, at least 1, at most 64."""
    return min(64, max(1, examples // 10))


def _encode_checked(
    conversations, field: str, spec: str, tokenizer, max_length: int, overlong: str, plain: bool
) -> Encoded:
    """`encode`, or a `FieldError` about `field` (the data `spec`) saying what went wrong and what helps when fewer
    than 2 examples are left (the other fields it names in backticks)."""
    encoded = encode(conversations, tokenizer, max_length, overlong, plain)
    if len(encoded.examples) >= 2:
        return encoded
    lost = []
    if encoded.dropped:
        advice = "raise `max_length`"
        if overlong == "drop" and encoded.dropped > encoded.prompt_too_long:
            advice += " or use `overlong` truncate"
        elif encoded.prompt_too_long:
            advice += ": their prompts alone are longer, truncating cannot keep an answer"
        lost.append(f"{encoded.dropped} dropped as longer than `max_length` {max_length} ({advice})")
    if encoded.refused:
        lost.append(dropped_text(encoded.refused))
    why = f"; {'; '.join(lost)}" if lost else ""
    problem = f"has {len(conversations)} conversations, {len(encoded.examples)} examples left{why}. At least 2 are "
    problem += "needed (one to train on, one held out)" + ("" if lost else ": add examples") + "."
    raise FieldError(field, problem, spec, owner="prepare")


def identify(
    prepared: Prepared,
    config: ILAConfig,
    batch_size: int,
    seed: int,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
) -> tuple[PeftModel, ILAResult]:
    """Wrap the model in the probe state and run ILA on the training split (checkpointing to `checkpoint`, and
    continuing from it if `resume`: see `identify_important_layers`)."""
    model = wrap(prepared.model, config)
    train = prepared.batches(batch_size, seed)
    result = identify_important_layers(
        model,
        train,
        progress=progress,
        accelerator=accelerator,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    return model, result


def lora_all_layers(prepared: Prepared, r: int, lora_alpha: float, lora_dropout: float, target_modules) -> PeftModel:
    """The baseline a user would pick instead: plain peft LoRA on every candidate layer."""
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules or "all-linear",
    )
    return wrap(prepared.model, config)


def method_config(method: str, selection: Selection, r: int, lora_alpha: float, lora_dropout: float, steps: int):
    """The peft config of `method` ("lora", "dora", "adalora"; "qlora" is LoRA, on a 4-bit base) on exactly the
    selected layers. AdaLoRA starts at rank ceil(1.5 r) and ends at an average rank r over `steps` steps (its
    budget shrinks from 10% to 80% of them)."""
    shape = dict(task_type="CAUSAL_LM", lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    if method == "adalora":
        schedule = dict(total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=1)
        config = AdaLoraConfig(init_r=math.ceil(1.5 * r), target_r=r, **schedule, **shape)
    else:
        config = LoraConfig(r=r, use_dora=method == "dora", **shape)
    return selection.to_peft_config(config)


def wrap(model: torch.nn.Module, config: ILAConfig | LoraConfig) -> PeftModel:
    """`get_peft_model`; what does not fit the model (top-k, target modules, layer names) raises a `FieldError`
    naming the field."""
    return get_peft_model(model, config)


@dataclass
class FinetuneReport:
    """Held-out loss before and after, and what the fine-tune cost."""

    loss_before: float
    loss_after: float
    steps: int
    tokens: int
    seconds: float
    median_step_seconds: float
    trainable_params: int
    total_params: int
    memory: dict
    losses: list[float]


def finetune(
    model: torch.nn.Module,
    prepared: Prepared,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float = 0.1,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    params: list[torch.nn.Parameter] | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    loss_before: float | None = None,
    sampler: LayerSampler | None = None,
    skip: int = 0,
    checkpoint: FinetuneCheckpoint | None = None,
) -> FinetuneReport:
    """AdamW with linear warmup and decay on `params` (default: the trainable ones, or a `sampler`'s groups); held-out
    loss measured before (unless given) and after. `on_step` runs after every step (see `train_steps`); an AdaLoRA
    model's `update_and_allocate` after every optimizer step, as AdaLoRA needs. With a `sampler` (sampled layerwise
    training) only its active set trains, re-drawn before every step; `trainable_params` is then the largest number
    of parameters trained at once. `skip`: micro-batches at the head of the data order already trained on (by the
    stage 1 of an identification whose weights are kept), so that the fine-tune goes on where it stopped. With a
    `checkpoint`, the state is saved before the first step and every `checkpoint.every` steps, after `on_step`; with
    `checkpoint.resume` the run goes on from the saved state (see `checkpoints.FinetuneState`)."""
    accelerator = accelerator or Accelerator()
    held_out = prepared.batches(batch_size, seed, held_out=True)
    if params is None:
        params = sampler.parameters() if sampler else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if sampler is not None:
        sampler.train_only_groups(model)  # nothing outside the groups computes gradients
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup * steps), steps)
    stream = DataPosition(itertools.islice(cycle(prepared.batches(batch_size, seed)), skip, None))
    settings = {"steps": steps, "lr": lr, "warmup": warmup, "seed": seed, "skip": skip, "processes": world_size()}
    settings.update(accumulation=accelerator.gradient_accumulation_steps, precision=str(accelerator.mixed_precision))
    state = None
    if checkpoint is not None:
        if hasattr(model.base_model, "update_and_allocate"):
            raise ValueError("AdaLoRA's rank allocation is not checkpointed: fine-tune it with checkpoint=None.")
        state = FinetuneState(checkpoint, model, params, optimizer, scheduler, stream, settings, sampler)
    on_step = _each(on_step, state.save_if_due if state is not None else None)  # a save holds what on_step did
    if sampler is not None:
        on_step = sampler.hook(optimizer, then=on_step)
    stats = None
    if state is not None and checkpoint.resume:
        stats = state.restore()
        loss_before = state.loss_before if loss_before is None else loss_before
    elif state is not None:
        state.save(StepStats())  # what the fine-tune starts from (an inline identification's weights, say)
    before = evaluate_loss(model, held_out, accelerator, progress) if loss_before is None else loss_before
    if state is not None:
        state.loss_before = before
    start_mb = reset_peak_memory()
    if stats is None or not stats.stop_reason:  # an interrupted run may have finished its steps already
        stats = train_steps(
            model,
            iter(stream),
            optimizer,
            steps,
            accelerator=accelerator,
            scheduler=scheduler,
            on_step=on_step,
            after_step=getattr(model.base_model, "update_and_allocate", None),
            desc="fine-tune",
            progress=progress,
            resume=stats,
        )
    memory = peak_memory_mb(start_mb)
    after = evaluate_loss(model, held_out, accelerator, progress)
    trainable = sampler.most_active if sampler is not None else sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return FinetuneReport(
        loss_before=before,
        loss_after=after,
        steps=stats.steps,
        tokens=stats.tokens,
        seconds=stats.seconds,
        median_step_seconds=statistics.median(stats.step_seconds) if stats.step_seconds else 0.0,
        trainable_params=trainable,
        total_params=total,
        memory=memory,
        losses=stats.losses,
    )


def _each(*hooks: Callable[[StepStats], None] | None) -> Callable[[StepStats], None] | None:
    """One `on_step` hook calling each of `hooks` (None ones left out) in order; None if there are none."""
    given = [hook for hook in hooks if hook is not None]
    if not given:
        return None

    def run(stats: StepStats) -> None:
        for hook in given:
            hook(stats)

    return run


def first_user_turn(conversation: Conversation) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer, conversation: Conversation, plain: bool, max_new_tokens: int = 48
) -> str:
    """Greedy answer to the conversation's first user turn."""
    text = prompt_text(conversation, tokenizer, plain)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
