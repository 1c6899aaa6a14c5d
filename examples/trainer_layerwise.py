import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import LayerSampler, LayerwiseCallback, LayerwiseConfig
from peft_ila.tuner.layerwise import block_groups

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

torch.manual_seed(0)  # a tiny random Llama stands in for your model
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
model = LlamaForCausalLM(config)
ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0)).tolist()
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 64, "labels": ids})
args = TrainingArguments(
    "lisa-trainer", max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
    use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
)  # fmt: skip

candidates = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name]
sampler = LayerSampler(block_groups(model, candidates), LayerwiseConfig(active=2, interval=10))
sampler.train_only_groups(model)  # every other parameter frozen
trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                  callbacks=[LayerwiseCallback(sampler)])  # fmt: skip
trainer.train()  # resume_from_checkpoint works: the draw of an interval depends only on the seed and the step
print(f"2 of {len(sampler.groups)} blocks at a time; the most parameters trained at once: {sampler.most_active:,}")
