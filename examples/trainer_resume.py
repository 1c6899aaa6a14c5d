import peft_ila  # noqa: F401, I001  (first: registers the PEFT type "ILA" and keeps peft's import quiet)
from peft_ila import ILACallback, ILAConfig

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers import default_data_collator
from transformers.trainer_utils import get_last_checkpoint


def make_base():  # a tiny random Llama stands in for your model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config)


class StopAt(TrainerCallback):
    """Stands in for a job killed after `step` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def launch(output_dir: str, resume: bool = False, stop_at: int | None = None) -> Trainer:
    """One launch of the job: identify, then 12 steps with a checkpoint every 4 (`resume`: from the last one)."""
    ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0)).tolist()
    train = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 64, "labels": ids})
    args = TrainingArguments(
        output_dir, max_steps=12, save_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        use_cpu=not torch.cuda.is_available(), report_to=[],
    )  # fmt: skip
    config = ILAConfig(task_type="CAUSAL_LM", top_k=0.25, stage1_max_steps=8, stage2_steps=4)
    model = get_peft_model(make_base(), config)  # the probe model, as the first launch built it
    checkpoint = get_last_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        model.base_model.select_as_saved(checkpoint)  # its selection: the callback will not identify again
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.add_callback(ILACallback(trainer))
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    return trainer


launch("ila-whole")  # uninterrupted, for comparison
launch("ila-resumed", stop_at=8)  # killed after step 8 (checkpoint-8 saved)
resumed = launch("ila-resumed", resume=True)  # a new launch: steps 9 to 12
whole, again = (load_file(f"{d}/adapter_model.safetensors") for d in ("ila-whole", "ila-resumed"))
same = all(torch.allclose(whole[k].float(), again[k].float(), rtol=0, atol=0, equal_nan=True) for k in whole)
print(f"resumed at step 8, ended at step {resumed.state.global_step}; the same adapter as uninterrupted: {same}")
