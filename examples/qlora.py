import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import ILAConfig, identify_important_layers

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)  # a tiny random Llama, saved as a model directory, stands in for yours
shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LlamaForCausalLM(LlamaConfig(vocab_size=128, **shape)).save_pretrained("tiny-llama")
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")


def load_base():  # linear layers stored in 4 bits by bitsandbytes (device_map="cuda" on a GPU)
    return AutoModelForCausalLM.from_pretrained("tiny-llama", quantization_config=nf4, device_map="cpu")


ids = torch.randint(0, 128, (6, 4, 32), generator=torch.Generator().manual_seed(1))
data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]

config = ILAConfig(task_type="CAUSAL_LM", top_k=0.25, stage1_max_steps=20, stage2_steps=10)
model = get_peft_model(load_base(), config)  # float32 adapters beside 4-bit weights
print("important layers:", identify_important_layers(model, data, progress=False).selected)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for batch in data:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

model.save_pretrained("ila-qlora")
loaded = PeftModel.from_pretrained(load_base(), "ila-qlora")
model.eval()
with torch.no_grad():
    before = model(**data[0]).logits
    print("max |logit difference| after reload:", (loaded(**data[0]).logits - before).abs().max().item())
    merged = loaded.merge_and_unload()  # dequantize, add the update, quantize again: warns that it rounds
    print("max |logit change| from merging into 4-bit weights:", (merged(**data[0]).logits - before).abs().max().item())
