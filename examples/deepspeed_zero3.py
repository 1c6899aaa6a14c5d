"""DeepSpeed ZeRO-3 after ILA, in two steps: identify in one process on a 4-bit base, then train LoRA on the selected
layers under ZeRO-3 with any number of processes. (`ILACallback` refuses DeepSpeed: its engine owns the gradients
and the partitioned weights that ILA's stages must train and read.)

    python examples/deepspeed_zero3.py identify                       # one process: writes ila-selection.json
    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py train     # ZeRO-3: writes lora-on-selection/

A tiny random Llama, saved as a model directory, stands in for yours. On GPUs, load the base in bfloat16 for step 2
and add `"bf16": {"enabled": "auto"}` with `TrainingArguments(bf16=True)`. Without a GPU DeepSpeed runs on its CPU
backend, where accelerate gives every process the whole dataset and the role of the main process: run it there with
`--nproc_per_node 1`.
"""

import json  # noqa: I001  (peft_ila before peft: it keeps peft's import quiet)
import sys
from pathlib import Path

from peft_ila import ILAConfig, Selection, identify_important_layers

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

MODEL, SELECTION, OUT = Path("tiny-llama"), Path("ila-selection.json"), Path("lora-on-selection")
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},  # whole adapter on save
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def examples(n: int) -> list[dict]:
    """`n` random token sequences of 32 tokens, as a language-modelling dataset."""
    ids = torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def identify() -> None:
    """Step 1, one process: ILA on the base stored in 4 bits (bitsandbytes NF4), the selection written as JSON."""
    if not MODEL.exists():
        torch.manual_seed(0)
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        LlamaForCausalLM(LlamaConfig(vocab_size=128, num_key_value_heads=2, **shape)).save_pretrained(MODEL)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=nf4, device_map="cpu")  # "cuda" on a GPU
    probe = get_peft_model(base, ILAConfig(task_type="CAUSAL_LM", top_k=0.25, stage1_max_steps=20, stage2_steps=10))
    batches = [default_data_collator(examples(24)[i : i + 4]) for i in range(0, 24, 4)]
    result = identify_important_layers(probe, batches, progress=False)
    SELECTION.write_text(json.dumps(result.selection.to_json(), indent=2))
    print("important layers:", result.selected)


def train() -> None:
    """Step 2, under torchrun: LoRA on exactly the selected layers (full names), trained by the Trainer under ZeRO-3."""
    selection = Selection.from_json(json.loads(SELECTION.read_text()))
    config = selection.to_peft_config(LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL), config)
    args = TrainingArguments(
        "zero3-run", deepspeed=ZERO3, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[]
    )
    trainer = Trainer(model, args, train_dataset=examples(16), data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(OUT)  # a normal adapter directory, gathered from the partitions
    if trainer.is_world_process_zero():
        print("trained LoRA on", len(selection.selected), "selected layers; saved to", OUT)


if __name__ == "__main__":
    {"identify": identify, "train": train}[sys.argv[1]]()
