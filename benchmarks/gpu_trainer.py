"""`Trainer` + `ILACallback` under accelerate's FSDP2, one process (run by `benchmarks.gpu`).

    torchrun --standalone --nproc_per_node 1 -m benchmarks.gpu_trainer --shape llama-3.2-1b --out DIR

A probe (ILA adapters on every candidate) of a random-weight Llama of `--shape` trains in a `Trainer` whose
`TrainingArguments` ask for FSDP2 (`fsdp="full_shard"`, version 2, every decoder block wrapped): the callback
identifies on the sharded probe with a small budget, the trainer fine-tunes the selection, saves a full state dict
as an adapter directory, and a fresh base with the same random weights loads it. On a CPU the Trainer ignores FSDP
and runs plain (the smoke test's run): `fsdp2` in the record says whether the parameters really were sharded.
Writes `trainer.json` to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments, default_data_collator

from benchmarks.gpu import ADAPTER, DTYPE, SHAPES, build, random_batch
from peft_ila import ILACallback, ILAConfig
from peft_ila.app.files import write_json

BUDGET = dict(top_k=0.25, stage1_max_steps=8, stability_window=2, stage2_steps=4)  # small: the path, not the scores
FSDP2 = {"version": 2, "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}  # both spellings
TRAINING = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-4, logging_steps=1)
QUIET = dict(report_to=[], save_strategy="no", disable_tqdm=True)  # nothing but what `run` saves itself


def fresh_base(shape: dict, device: str) -> torch.nn.Module:
    """A Llama of `shape` with the same random weights every time."""
    torch.manual_seed(0)
    return build(shape, device, DTYPE[device])


def run(shape_name: str, device: str, length: int, out: Path) -> dict:
    """Identify with the callback, fine-tune, save, reload: what happened, as a JSON-able record."""
    shape = SHAPES[shape_name]
    probe = get_peft_model(fresh_base(shape, device), ILAConfig(task_type="CAUSAL_LM", **ADAPTER, **BUDGET))
    cuda = device == "cuda"
    fsdp = {"fsdp": "full_shard", "fsdp_config": FSDP2} if cuda else {}
    args = TrainingArguments(str(out / "trainer"), **TRAINING, **QUIET, bf16=cuda, use_cpu=not cuda, **fsdp)
    batch = random_batch(shape["vocab"], 32, length)
    data = [{key: tensor[i] for key, tensor in batch.items()} for i in range(32)]
    trainer = Trainer(probe, args, train_dataset=data, data_collator=default_data_collator)
    callback = ILACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    model = trainer.model
    sharded = any(isinstance(p, DTensor) for p in model.parameters())  # FSDP2's parameters are DTensors
    trainer.save_model(str(out / "adapter"))  # FULL_STATE_DICT: gathered, written by the main process
    ids = data[0]["input_ids"][None].to(device)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits.float()
        base = fresh_base(shape, device)
        plain = base(input_ids=ids).logits.float()
        again = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits.float()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "shape": shape_name,
        "fsdp2": bool(trainer.is_fsdp_enabled and sharded),
        "selected": len(callback.result.selected),
        "candidates": len(callback.result.selection.candidates),
        "stage1_steps": callback.result.stage1.steps,
        "stage2_steps": callback.result.stage2.steps,
        "fine_tune_losses": losses,
        "saved": sorted(p.name for p in (out / "adapter").iterdir()),
        "adapter_max_abs_logit_effect": float((logits - plain).abs().max()),  # the fine-tune changed something
        "reload_max_abs_logit_difference": float((logits - again).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(DTYPE))
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = run(args.shape, args.device, args.length, args.out)
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        write_json(args.out / "trainer.json", record)
    return record


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
