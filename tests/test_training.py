"""The one training loop: steps, gradient accumulation, stopping, evaluation."""

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model

from conftest import lm_batches, tiny_llama
from peft_ila import ILAConfig
from peft_ila.identification.training import StabilityTest, cycle, evaluate_loss, train_steps


def probe_model():
    return get_peft_model(tiny_llama(), ILAConfig(r=2, selected_layers=["model.layers.0.mlp.up_proj"]))


def test_gradient_accumulation_counts_optimizer_steps():
    model = probe_model()
    calls = []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    stats = train_steps(
        model,
        cycle(lm_batches(4)),
        optimizer,
        max_steps=3,
        accelerator=Accelerator(gradient_accumulation_steps=2),
        progress=False,
    )
    assert stats.steps == 3 and len(calls) == 3 and stats.stop_reason == "max_steps"
    assert stats.tokens == 6 * 4 * 12  # six micro-batches of 4 x 12 tokens
    assert stats.micro_batches == 6  # where the data order goes on: what follows identification reads this
    assert len(stats.losses) == len(stats.step_seconds) == 3


def test_data_exhausted_and_non_finite_loss():
    model = probe_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stats = train_steps(model, iter(lm_batches(2)), optimizer, max_steps=10, progress=False)
    assert stats.steps == 2 and stats.stop_reason == "data_exhausted"
    with pytest.raises(FloatingPointError, match=r"train: the loss became nan at step 1"):
        train_steps(
            model, iter(lm_batches(1)), optimizer, 5, penalty=lambda: torch.tensor(float("nan")), progress=False
        )


def test_evaluate_loss_is_token_weighted():
    model = tiny_llama()
    (batch,) = lm_batches(1)
    with torch.no_grad():
        expected = float(model(**batch).loss)
    half = {k: v[:2] for k, v in batch.items()}
    rest = {k: v[2:] for k, v in batch.items()}
    assert evaluate_loss(model, [half, rest]) == pytest.approx(expected, rel=1e-5)
    batch["labels"][:, :6] = -100
    with torch.no_grad():
        masked = float(model(**batch).loss)
    assert evaluate_loss(model, [batch]) == pytest.approx(masked, rel=1e-5)


def test_stability_test_and_cycle():
    flat = StabilityTest(epsilon=0.01, window=3)
    assert [flat.update(2.0) for _ in range(6)] == [False] * 5 + [True]
    falling = StabilityTest(epsilon=0.01, window=3)
    assert not any(falling.update(10.0 - i) for i in range(20))
    assert [b for _, b in zip(range(5), cycle([1, 2]), strict=False)] == [1, 2, 1, 2, 1]
    assert list(cycle(iter([1, 2]))) == [1, 2]


def test_on_step_sees_each_step_with_its_stop_decision():
    model = probe_model()
    seen = []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    on_step = lambda stats: seen.append((stats.steps, stats.stop_reason))  # noqa: E731
    train_steps(model, cycle(lm_batches(2)), optimizer, 4, on_step=on_step, progress=False)
    assert seen == [(1, ""), (2, ""), (3, ""), (4, "max_steps")]


def test_resumed_stats_continue_counting():
    model = probe_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = train_steps(model, cycle(lm_batches(2)), optimizer, 2, progress=False)
    first.stop_reason = ""
    before = (first.tokens, first.seconds, list(first.losses))
    stats = train_steps(model, cycle(lm_batches(2)), optimizer, 5, progress=False, resume=first)
    assert stats.steps == 5 and stats.stop_reason == "max_steps" and stats.losses[:2] == before[2]
    assert len(stats.losses) == 5 and stats.tokens == 5 * before[0] // 2 and stats.seconds > before[1]
