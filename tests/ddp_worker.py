"""One rank of the multi-process tests (launched by torchrun from tests/test_distributed.py).

    torchrun --nproc_per_node 2 tests/ddp_worker.py {function|callback|layerwise|fsdp|deepspeed} OUT_DIR

Each rank identifies on its own shard of the data and fine-tunes a few steps, then writes OUT_DIR/rank<r>.json
(its selection and a fingerprint of its adapter weights); rank 0 also saves the adapter and the logits it gives on
fixed inputs (safetensors), for the test to reload and compare. In "function" mode each rank also reports, for
every estimator, whether an interrupted and resumed identification ended as the uninterrupted one
(OUT_DIR/resumed<r>.json). In "layerwise" mode each rank fine-tunes a tiny Llama's block weights under the Trainer
with `LayerwiseCallback` and writes its draws and a fingerprint of every weight. In "fsdp" mode a probe sharded by
FSDP2 identifies as the unsharded run does (every estimator), then fine-tunes and saves from a full state dict; and
`ILACallback` identifies on a sharded probe as under the Trainer's FSDP2. In "deepspeed" mode (one process: on CPU
accelerate runs DeepSpeed per process) the callback in a Trainer under ZeRO-3 says why it cannot identify there.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainerControl, TrainerState, default_data_collator

# tests/ is this script's directory, so on sys.path
from conftest import (
    interrupt_at_forward,
    llama_candidates,
    lm_batches,
    lm_dataset,
    tiny_llama,
    trainer_args,
    without_seconds,
)
from peft_ila import ILACallback, ILAConfig, LayerSampler, LayerwiseCallback, LayerwiseConfig, identify_important_layers
from peft_ila.identification.distributed import agree_on, rank, world_size
from peft_ila.identification.estimators import ESTIMATORS
from peft_ila.identification.training import cycle, train_steps
from peft_ila.tuner.layerwise import block_groups

CONFIG = dict(r=2, top_k=6, stage1_max_steps=12, stability_window=3, stage2_steps=8, gate_lr=0.2, seed=3)
CONFIG_ESTIMATOR = "gates"


def run_function(out: Path) -> tuple[torch.nn.Module, list[str]]:
    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=CONFIG_ESTIMATOR))
    shard = lm_batches(8, seed=1)[rank() :: world_size()]
    result = identify_important_layers(model, shard, progress=False, accelerator=accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    train_steps(model, cycle(shard), torch.optim.AdamW(params, lr=1e-2), 3, accelerator, progress=False)
    verdicts = {}
    for estimator in ESTIMATORS:  # every estimator resumes to its uninterrupted result under two processes
        whole = result if estimator == CONFIG_ESTIMATOR else identify(shard, estimator)
        resumed = interrupted_and_resumed(shard, out / f"checkpoint-{estimator}.safetensors", estimator)
        verdicts[estimator] = (
            "same as uninterrupted" if without_seconds(resumed) == without_seconds(whole) else "differs"
        )
    (out / f"resumed{rank()}.json").write_text(json.dumps(verdicts))
    try:  # a rank that selected other layers is an error on every rank
        agree_on(["a", "b"][:: 1 if rank() == 0 else -1], {}, 1)
        (out / f"mismatch{rank()}.txt").write_text("no error")
    except RuntimeError as exc:
        (out / f"mismatch{rank()}.txt").write_text(str(exc))
    return model, result.selected


def identify(shard: list, estimator: str):
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=estimator))
    return identify_important_layers(model, shard, progress=False, accelerator=Accelerator(cpu=True))


def interrupted_and_resumed(shard: list, checkpoint: Path, estimator: str):
    """Identification stopped (on every rank) at the 15th forward pass (stage 2 for an estimator with a stage, else
    stage 1), then resumed from its checkpoint."""
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=estimator))
    hook = interrupt_at_forward(model, 15 if ESTIMATORS[estimator](model.peft_config["default"]).steps() else 5)
    kwargs = dict(progress=False, accelerator=Accelerator(cpu=True), checkpoint=checkpoint, checkpoint_every=2)
    with contextlib.suppress(KeyboardInterrupt):
        identify_important_layers(model, shard, **kwargs)
    hook.remove()
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=estimator))
    return identify_important_layers(model, shard, resume=True, **kwargs)


def run_callback(out: Path) -> tuple[torch.nn.Module, list[str]]:
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=CONFIG_ESTIMATOR))
    args = trainer_args(out / "trainer", max_steps=3)
    trainer = Trainer(model, args, train_dataset=lm_dataset(8), data_collator=default_data_collator)
    callback = ILACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    return model, callback.result.selected


def run_layerwise(out: Path) -> None:
    """Block weights trained under DDP by the Trainer, 1 of 4 blocks at a time, re-drawn every 2 of 4 steps."""
    model = tiny_llama()
    sampler = LayerSampler(block_groups(model, llama_candidates()), LayerwiseConfig(active=1, interval=2))
    sampler.train_only_groups(model)
    args = trainer_args(out / "trainer", max_steps=4)
    trainer = Trainer(model, args, train_dataset=lm_dataset(8), data_collator=default_data_collator)
    trainer.add_callback(LayerwiseCallback(sampler))
    trainer.train()
    weights = {n: [float(p.detach().sum()), float(p.detach().abs().sum())] for n, p in model.named_parameters()}
    draws = [sampler.draw(i) for i in range(2)]
    (out / f"rank{rank()}.json").write_text(json.dumps({"draws": draws, "weights": weights}))


def shard(model: torch.nn.Module, **options) -> None:
    """FSDP2 as a user applies it: every decoder block, then the root (`options`: `fully_shard`'s)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.model.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)


def in_mixed_precision(data: list, accelerator: Accelerator) -> dict:
    """Identification and 2 fine-tune steps on a probe sharded with bf16 compute (a `MixedPrecisionPolicy`, as
    accelerate's FSDP2 under bf16): the gates start training in stage 2 and the selection freezes the rest, so FSDP
    must cast each stage's reduced gradients back to float32. What it selected, and whether the steps moved it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    probe = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=CONFIG_ESTIMATOR))
    shard(probe, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    result = identify_important_layers(probe, data, progress=False, accelerator=accelerator)
    params = [p for p in probe.parameters() if p.requires_grad]
    before = [p.detach().full_tensor().clone() for p in params]
    train_steps(probe, cycle(data), torch.optim.AdamW(params, lr=1e-2), 2, accelerator, progress=False)
    moved = all(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, params, strict=True))
    return {"selected": result.selected, "moved": moved, "dtypes": sorted({str(p.dtype) for p in params})}


def identify_in_callback(data: list, out: Path) -> dict:
    """`ILACallback.on_train_begin` called as the Trainer calls it under accelerate's FSDP2 (which needs a GPU): on a
    sharded probe, with the optimizer the trainer built on its shards. What it selected, and whether that optimizer
    now holds exactly the parameters that still train."""
    probe = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=CONFIG_ESTIMATOR))
    shard(probe)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-2)
    callback = ILACallback()
    args, state = trainer_args(out / "callback", max_steps=3), TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=probe, optimizer=optimizer, train_dataloader=data)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in probe.parameters() if p.requires_grad}
    result = callback.result
    record = {"estimator": CONFIG_ESTIMATOR, "selected": result.selected, "scores": result.scores}
    return {**record, "optimizer_holds_what_trains": held == trainable}


def run_fsdp(out: Path) -> None:
    """Identification on a probe sharded by FSDP2 against the unsharded (DDP-style) run on the same data, for every
    estimator; then the sharded model, left in the selected state, fine-tunes and is saved from a full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    accelerator = Accelerator(cpu=True)  # starts the gloo group
    data = lm_batches(8, seed=1)[rank() :: world_size()]
    runs = {}
    for estimator in sorted(ESTIMATORS, key=lambda name: name == CONFIG_ESTIMATOR):  # CONFIG_ESTIMATOR's last
        probe = get_peft_model(tiny_llama(), ILAConfig(**CONFIG, estimator=estimator))
        shard(probe)
        sharded = identify_important_layers(probe, data, progress=False, accelerator=accelerator)
        plain = identify(data, estimator)
        runs[estimator] = {"selected": [plain.selected, sharded.selected], "scores": [plain.scores, sharded.scores]}
    try:
        again = get_peft_model(tiny_llama(), ILAConfig(**CONFIG))
        shard(again)
        identify_important_layers(again, data, progress=False, checkpoint=out / "checkpoint.safetensors")
        refused = "no error"
    except ValueError as exc:
        refused = str(exc)
    params = [p for p in probe.parameters() if p.requires_grad]
    train_steps(probe, cycle(data), torch.optim.AdamW(params, lr=1e-2), 3, accelerator, progress=False)
    state = get_model_state_dict(probe, options=StateDictOptions(full_state_dict=True))  # whole, on every rank
    ids = torch.arange(20).reshape(2, 10) % 64
    with torch.no_grad():
        logits = probe.eval()(input_ids=ids).logits
    if rank() == 0:
        probe.save_pretrained(out / "adapter", state_dict=state)
        save_file({"input_ids": ids, "logits": logits.contiguous()}, out / "logits.safetensors")
    fingerprint = {n: [float(w.sum()), float(w.abs().sum())] for n, w in state.items() if "ila_" in n}
    record = {"runs": runs, "refused": refused, "weights": fingerprint, "selected": sharded.selected}
    record["callback"] = identify_in_callback(data, out)
    record["mixed_precision"] = in_mixed_precision(data, accelerator)
    (out / f"rank{rank()}.json").write_text(json.dumps(record))


def run_deepspeed(out: Path) -> None:
    """`ILACallback` on a probe inside a Trainer under DeepSpeed ZeRO-3: what it says."""
    model = get_peft_model(tiny_llama(), ILAConfig(**CONFIG))
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    args = trainer_args(out / "trainer", use_cpu=False, deepspeed=zero3)
    trainer = Trainer(model, args, train_dataset=lm_dataset(8), data_collator=default_data_collator)
    trainer.add_callback(ILACallback(trainer))
    try:
        trainer.train()
        refused = "no error"
    except ValueError as exc:
        refused = str(exc)
    (out / f"rank{rank()}.json").write_text(json.dumps({"refused": refused, "deepspeed": trainer.is_deepspeed_enabled}))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "layerwise":
        return run_layerwise(out)
    if mode == "fsdp":
        return run_fsdp(out)
    if mode == "deepspeed":
        return run_deepspeed(out)
    model, selected = (run_function if mode == "function" else run_callback)(out)
    weights = {n: p.detach() for n, p in model.named_parameters() if "ila_" in n}
    fingerprint = {n: [float(w.sum()), float(w.abs().sum())] for n, w in weights.items()}
    (out / f"rank{rank()}.json").write_text(json.dumps({"selected": selected, "weights": fingerprint}))
    if rank() == 0:
        model.save_pretrained(out / "adapter")
        ids = torch.arange(20).reshape(2, 10) % 64
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits.contiguous()
        save_file({"input_ids": ids, "logits": logits}, out / "logits.safetensors")


def end_process_group(finished: bool) -> None:
    """Tear gloo down while the interpreter is whole, as the CLI does: a live group, or one destroyed while FSDP's
    objects (models, meshes, finished collectives) wait in reference cycles for the interpreter's last collection, can
    abort the process at exit ("terminate called without an active exception"). After a clean run the ranks first
    meet, so that neither closes its connections while the other still reads from them."""
    gc.collect()
    if not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    finished = False
    try:
        main()
        finished = True
    finally:
        end_process_group(finished)
