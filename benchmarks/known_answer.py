"""A task whose answer is known: which layers need to change is planted, so an estimator can be right or wrong.

A tiny random Llama (the student) and training sequences sampled from a teacher that differs from it only in two
planted layers: fitting the data needs exactly those layers to change. The tests check that the estimators put them
on top; the stability study (`stability.py`) reports, for every estimator and stage-1 length, where they land over
several seeds, because a ranking that reruns reproduce is worth something only if it also finds what matters.
"""

from __future__ import annotations

import copy
import math
import statistics

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.baselines import gradnorm_scores
from benchmarks.core.stats import top_k
from peft_ila import ILAConfig, ILALayer, identify_important_layers

VOCAB = 64
PLANTED = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"]
TASK = dict(r=4, stage1_lr=0.01)  # the adapters of the planted task (its tests and the study's rows)
# the student's LlamaConfig
STUDENT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)  # fmt: skip


def student(seed: int = 0) -> LlamaForCausalLM:
    """The task's student: a random Llama of `STUDENT` shape (4 blocks of width 32: 28 candidate linear layers)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**STUDENT)).eval()


def teacher_data(student, planted: list[str], n: int = 1024, batch: int = 32, seed: int = 0) -> list[dict]:
    """Perturb `planted` layers of a copy of `student` by a rank-2 update as large as the weight itself, and
    sample training sequences (16 tokens, the first 2 a prompt that is not learned) from that teacher: only the
    planted layers need to change to fit them. Batches of `batch` sequences, as dicts of [batch, 16] tensors."""
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in planted:
            w = teacher.get_submodule(name).weight
            delta = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
            w += delta / delta.norm() * w.norm()
        seq = torch.randint(0, VOCAB, (n, 2), generator=g)
        for _ in range(14):
            probs = teacher(input_ids=seq).logits[:, -1].softmax(-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
    labels = seq.clone()
    labels[:, :2] = -100  # the prompt is not learned
    parts = dict(input_ids=seq, attention_mask=torch.ones_like(seq), labels=labels)
    return [{name: part[i : i + batch] for name, part in parts.items()} for i in range(0, n, batch)]


def planted_ranks(method: str, fields: dict, stage1_steps: int, stage2_steps: int, seed: int) -> tuple[list[int], int]:
    """Where the planted layers land (1-based ranks, sorted) on the task of `seed` (student, teacher and ILA seed),
    and the number of candidate layers ranked.

    `method`: "ila" (identification with the `ILAConfig` `fields` of an estimator, its own ranking), "relative"
    (||dW|| / ||W|| after stage 1) or "gradient norm" (`baselines.gradnorm_scores` over `stage1_steps` steps)."""
    student_model = student(seed=seed)
    batches = teacher_data(student_model, PLANTED, seed=seed)
    if method == "gradient norm":
        probe = get_peft_model(student_model, ILAConfig(**TASK, seed=seed))
        torch.manual_seed(seed)
        scores = gradnorm_scores(probe, batches, stage1_steps, TASK["stage1_lr"])
        ranking = top_k(scores, len(scores))
    else:
        relative = method == "relative"
        budget = dict(stage1_max_steps=stage1_steps, stage2_steps=stage2_steps, seed=seed)
        config = ILAConfig(**TASK, **fields, **budget, top_k=1.0 if relative else 2, keep_stage1_weights=relative)
        model = get_peft_model(student_model, config)
        ranking = identify_important_layers(model, batches, progress=False).ranking
        if relative:
            ratios = {
                name.removeprefix("base_model.model."): m.update_norm("default") / float(m.base_layer.weight.norm())
                for name, m in model.named_modules()
                if isinstance(m, ILALayer)
            }
            ranking = top_k(ratios, len(ratios))
    return sorted(ranking.index(name) + 1 for name in PLANTED), len(ranking)


def summary(ranks: list[list[int]], candidates: int) -> dict:
    """Over runs: how often the planted layers are exactly the top ones, their mean rank, and what a random ranking
    of the `candidates` would give (mean rank (n + 1) / 2; the planted pair on top once in C(n, 2))."""
    best = list(range(1, len(PLANTED) + 1))
    return {
        "found": sum(r == best for r in ranks),
        "runs": len(ranks),
        "mean_rank": statistics.mean(x for r in ranks for x in r),
        "random_mean_rank": (candidates + 1) / 2,
        "random_found": 1 / math.comb(candidates, len(PLANTED)),
    }
