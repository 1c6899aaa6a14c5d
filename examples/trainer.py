import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import ILACallback, ILAConfig

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator


def make_base():  # a tiny random Llama stands in for your model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config)


ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0)).tolist()  # 64 examples of 32 tokens
train = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 64, "labels": ids})
args = TrainingArguments(
    "ila-trainer", max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
    use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
)  # fmt: skip
# the default budget identifies for 128 + 32 steps before the first training step: 16 + 8 here
config = ILAConfig(task_type="CAUSAL_LM", top_k=0.25, stage1_max_steps=16, stage2_steps=8)
model = get_peft_model(make_base(), config)  # probe state: an adapter on every candidate layer
trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
ila = ILACallback(trainer)
trainer.add_callback(ila)
trainer.train()  # ILA on the trainer's own batches first, then the fine-tune of the selected layers only
trainer.save_model()  # an ILA adapter: weights and mask
print(f"selected {len(ila.result.selected)} of {len(ila.result.scores)} layers: {ila.result.selected[:2]} ...")
print(f"fine-tune steps: {trainer.state.global_step}")

loaded = PeftModel.from_pretrained(make_base(), "ila-trainer")
assert loaded.peft_config["default"].selected_layers == ila.result.selected
