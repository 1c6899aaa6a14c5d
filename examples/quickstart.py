import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import ILAConfig, identify_important_layers

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def make_base():  # a tiny random Llama stands in for your model
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


ids = torch.randint(0, 128, (8, 4, 32), generator=torch.Generator().manual_seed(0))  # 8 batches of 4 x 32 tokens
batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]

config = ILAConfig(
    task_type="CAUSAL_LM",
    r=8,
    lora_alpha=16,
    target_modules="all-linear",
    top_k=0.25,
    stage1_max_steps=60,
    stage2_steps=30,
)
model = get_peft_model(make_base(), config)  # probe state: gated adapters on all 28 candidate layers
result = identify_important_layers(model, batches)  # stage 1 + stage 2, then adapters stay on the top 7 only
print("important layers:", result.selected)
print(f"stage 1 ended '{result.stage1.stop_reason}' after {result.stage1.steps} steps, {result.stage1.seconds:.1f} s")
model.print_trainable_parameters()

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for batch in batches:  # ...train as usual (a loop here; transformers.Trainer works the same way)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

model.save_pretrained("ila-quickstart")  # adapter_config.json + adapter_model.safetensors (weights AND mask)
loaded = PeftModel.from_pretrained(make_base(), "ila-quickstart")  # adapters rebuilt on the selected layers only
model.eval()
print(
    "max |logit difference| after reload:",
    (loaded(**batches[0]).logits - model(**batches[0]).logits).abs().max().item(),
)
