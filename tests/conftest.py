"""Tiny randomly initialised models built from configs, and batches for them."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types

import datasets
import hypothesis
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

import peft_ila  # noqa: F401  (registers the ILA PEFT type)

os.environ.setdefault("TQDM_DISABLE", "1")
# property tests: the same examples on every run (CI is reproducible) and no per-example deadline (CI is noisy)
hypothesis.settings.register_profile("peft-ila", derandomize=True, deadline=None)
hypothesis.settings.load_profile("peft-ila")


VOCAB = 64


def tiny_llama(
    seed: int = 0, layers: int = 4, init_range: float = 0.2, hidden: int = 32, vocab: int = VOCAB, **extra
) -> LlamaForCausalLM:
    """A random Llama with `layers` blocks of width `hidden` (28 candidate linear layers at the defaults)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init_range,
        **extra,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


class TinyMLP(nn.Module):
    """A plain classifier: lin0 -> relu -> lin1 -> relu -> head; forward(x, labels) returns .logits and .loss."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> types.SimpleNamespace:
        logits = self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return types.SimpleNamespace(logits=logits, loss=loss)


def lm_batches(n_batches: int = 4, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def interrupt_at_forward(model, n: int) -> torch.utils.hooks.RemovableHandle:
    """Make the `n`-th forward of a PeftModel over a tiny LM raise KeyboardInterrupt, as Ctrl-C mid-run would."""
    forwards = []

    def stop(*_):
        forwards.append(1)
        if len(forwards) == n:
            raise KeyboardInterrupt

    return model.base_model.model.lm_head.register_forward_pre_hook(stop)


def without_seconds(result) -> dict:
    """An ILAResult as a dict, without the wall-clock times of its stages."""
    record = dataclasses.asdict(result)
    for stage in ("stage1", "stage2"):
        record[stage] = {k: v for k, v in record[stage].items() if not k.endswith("seconds")}
    return record


def lm_dataset(n_batches: int = 6) -> datasets.Dataset:
    """The examples of `lm_batches(n_batches, seed=1)` as a datasets.Dataset, for transformers.Trainer."""
    return datasets.Dataset.from_list(
        [{k: v[i].tolist() for k, v in b.items()} for b in lm_batches(n_batches, seed=1) for i in range(4)]
    )


def trainer_args(out, **extra) -> TrainingArguments:
    """Small, quiet, CPU TrainingArguments writing to `out`."""
    defaults = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    return TrainingArguments(str(out), **{**defaults, **extra})


def llama_candidates(layers: int = 4) -> list[str]:
    kinds = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    return [f"model.layers.{i}.{k}" for i in range(layers) for k in kinds]


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_lm_dir(path, chat_template: bool = True, seed: int = 0, layers: int = 2):
    """A tiny random Llama (`layers` blocks) and a byte tokenizer saved as a model directory (what --model DIR
    expects)."""
    tokenizer = byte_tokenizer(chat_template)
    model = tiny_llama(
        seed,
        layers=layers,
        init_range=0.02,
        vocab=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_gguf(path, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A tiny random Llama with a byte tokenizer and ChatML template as a float32 .gguf file (what --model FILE.gguf
    expects), written with the gguf package."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 3) + [3] * 3)  # normal bytes, then control tokens
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_eos_token_id(len(tokens) - 3)
    writer.add_pad_token_id(len(tokens) - 2)
    writer.add_chat_template(CHATML)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // 2, hidden), "attn_v": (hidden // 2, hidden)}
    shapes.update(attn_output=(hidden, hidden), ffn_gate=(2 * hidden, hidden), ffn_up=(2 * hidden, hidden))
    shapes.update(ffn_down=(hidden, 2 * hidden))
    tensors = {"token_embd": (len(tokens), hidden), "output": (len(tokens), hidden)}
    tensors.update({f"blk.{i}.{name}": shape for i in range(layers) for name, shape in shapes.items()})
    for name, shape in tensors.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ["output_norm", *(f"blk.{i}.{norm}" for i in range(layers) for norm in ("attn_norm", "ffn_norm"))]:
        writer.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def alpaca_rows(n: int = 40) -> list[dict]:
    words = ["red", "blue", "green", "small", "large", "fast", "slow", "warm"]
    return [
        {
            "instruction": f"Name a {words[i % 8]} thing.",
            "input": "" if i % 3 else "Be brief.",
            "output": f"A {words[i % 8]} {words[(i * 3) % 8]} box number {i}.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """A directory with a tiny model directory `lm` and a 40-example alpaca file `data.json`, for the CLI tests."""
    root = tmp_path_factory.mktemp("cli")
    tiny_lm_dir(root / "lm")
    (root / "data.json").write_text(json.dumps(alpaca_rows(40)))
    return root


def common(work, *extra) -> list[str]:
    """CLI options for the tiny model and data of `work`, then `extra`."""
    return [
        "--model",
        str(work / "lm"),
        "--data",
        str(work / "data.json"),
        "--max-length",
        "96",
        "--eval-size",
        "8",
        "--no-progress",
        *extra,
    ]


def identify(work, out, *extra) -> None:
    """`peft-ila identify` on `work` with a tiny budget (6 + 3 steps), into `out`."""
    from peft_ila.app.cli import main

    args = ["identify", *common(work, "--stage1-max-steps", "6", "--stage2-steps", "3", *extra), "--out", str(out)]
    assert main(args) == 0


@pytest.fixture(scope="session")
def run(work):
    """A run directory of `identify` on `work`."""
    identify(work, work / "run")
    return work / "run"
