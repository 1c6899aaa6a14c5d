"""ILA on a model sharded by FSDP2 (`fully_shard`), under torchrun: gloo on CPUs, NCCL on GPUs.

    torchrun --nproc_per_node 2 examples/fsdp2.py

A tiny random Llama stands in for your model; every rank feeds its own shard of the data.
"""

import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import ILAConfig, identify_important_layers

import gc

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
torch.manual_seed(0)  # the same base and adapters on every rank
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
ila = ILAConfig(task_type="CAUSAL_LM", top_k=0.25, stage1_max_steps=8, stage2_steps=4)
probe = get_peft_model(LlamaForCausalLM(config).to(device), ila)

for block in probe.base_model.model.model.layers:
    fully_shard(block)
fully_shard(probe)
ids = torch.randint(0, 128, (8, 4, 32), generator=torch.Generator().manual_seed(rank)).to(device)  # this rank's
batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
result = identify_important_layers(probe, batches, progress=False)

optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-3)
for batch in batches:  # fine-tune `probe` as any FSDP model: it holds the selected layers' adapters
    probe(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state = get_model_state_dict(probe, options=StateDictOptions(full_state_dict=True))
if rank == 0:
    probe.save_pretrained("ila-fsdp2", state_dict=state)  # a normal adapter directory
    print(f"{dist.get_world_size()} ranks selected {len(result.selected)} layers; adapter saved to ila-fsdp2")
dist.barrier()  # no rank closes its connections while another still reads from them
del probe, optimizer, state  # FSDP's modules and meshes hold the group in reference cycles: free them now, since
gc.collect()  # gloo torn down while the interpreter exits can abort ("terminate called without an active exception")
dist.destroy_process_group()
