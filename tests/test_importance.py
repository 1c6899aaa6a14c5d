"""The ILA algorithm: a planted answer is found; stage 1 stops on stability or on its cap; the result is complete."""

import pytest
import torch
from peft import get_peft_model

from benchmarks.known_answer import PLANTED, teacher_data
from conftest import llama_candidates, lm_batches, tiny_llama
from peft_ila import ILAConfig, ILALayer, identify_important_layers
from peft_ila.tuner.selection import as_float32


@pytest.mark.parametrize("seed", [0, 1])
def test_the_first_order_estimator_finds_the_planted_layers_without_training_gates(seed):
    student = tiny_llama(seed=seed)
    batches = teacher_data(student, PLANTED, seed=seed)
    config = ILAConfig(
        r=4,
        top_k=2,
        stage1_lr=0.01,
        stage1_max_steps=200,
        stability_epsilon=1e-3,
        stage2_steps=8,
        estimator="first-order",
    )
    result = identify_important_layers(get_peft_model(student, config), batches, progress=False)
    assert set(result.selected) == set(PLANTED), result.ranking[:5]
    assert min(result.scores.values()) == 0.0 and max(result.scores.values()) == 1.0 and result.stage2.steps == 8


def test_the_update_norm_estimator_scores_norms_and_has_no_second_stage():
    config = ILAConfig(r=2, top_k=3, stage1_max_steps=5, estimator="update-norm")
    result = identify_important_layers(get_peft_model(tiny_llama(), config), lm_batches(3), progress=False)
    top = max(result.update_norms.values())
    assert result.scores == {name: as_float32(norm / top) for name, norm in result.update_norms.items()}
    assert result.stage2.steps == 0 and result.stage2.losses == [] and len(result.selected) == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_known_answer_planted_layers_rank_on_top(seed):
    student = tiny_llama(seed=seed)
    batches = teacher_data(student, PLANTED, seed=seed)
    budget = dict(stage1_lr=0.01, stage1_max_steps=200, stability_epsilon=1e-3, stage2_steps=100)
    config = ILAConfig(r=4, top_k=2, **budget, estimator="gates")
    model = get_peft_model(student, config)
    result = identify_important_layers(model, batches, progress=False)
    assert set(result.ranking[:2]) == set(PLANTED), result.ranking[:5]
    assert set(result.selected) == set(PLANTED)
    assert min(result.scores[n] for n in PLANTED) > 0.5 > max(result.scores[n] for n in result.ranking[2:])
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, ILALayer)}
    assert wrapped == set(PLANTED)
    assert config.selected_layers == result.selected and config.layer_scores == result.scores


def test_stage1_stops_when_stable_before_its_cap():
    student = tiny_llama()
    batches = teacher_data(student, PLANTED, n=512)
    config = ILAConfig(r=4, top_k=2, stage1_lr=0.01, stage1_max_steps=400, stability_epsilon=1e-3, stage2_steps=2)
    result = identify_important_layers(get_peft_model(student, config), batches, progress=False)
    assert result.stage1.stop_reason == "stable"
    assert 2 * config.stability_window <= result.stage1.steps < config.stage1_max_steps
    assert result.stage1.losses[-1] < result.stage1.losses[0]


@pytest.mark.parametrize(("epsilon", "stop", "steps"), [(1e-3, "stable", 10), (0.0, "max_steps", 30)])
def test_epsilon_zero_turns_the_loss_test_off(epsilon, stop, steps):
    # one batch and a vanishing learning rate: the loss is flat, so any test that is on stops at 2 windows
    config = ILAConfig(r=2, stage1_lr=1e-12, stage1_max_steps=30, stability_window=5, stability_epsilon=epsilon)
    result = identify_important_layers(get_peft_model(tiny_llama(), config), lm_batches(1), progress=False)
    assert (result.stage1.stop_reason, result.stage1.steps) == (stop, steps)


def test_stage1_hits_its_cap_on_a_noisy_task():
    batches = lm_batches(n_batches=64, batch=1, seq=4)  # fresh random tokens: the loss never settles
    config = ILAConfig(r=2, stage1_max_steps=60, stability_window=5, stability_epsilon=1e-3, stage2_steps=2)
    result = identify_important_layers(get_peft_model(tiny_llama(), config), batches, progress=False)
    assert result.stage1.stop_reason == "max_steps" and result.stage1.steps == 60


def test_result_records_costs_and_curves():
    batches = lm_batches(n_batches=3, batch=2, seq=8)
    config = ILAConfig(r=2, top_k=0.25, stage1_max_steps=7, stage2_steps=4)
    model = get_peft_model(tiny_llama(), config)
    result = identify_important_layers(model, batches, progress=False)
    assert (result.stage1.steps, result.stage2.steps) == (7, 4)
    assert (result.stage1.tokens, result.stage2.tokens) == (7 * 16, 4 * 16)
    assert len(result.stage1.losses) == 7 and len(result.stage2.losses) == 4
    assert result.stage1.seconds > 0 and result.stage2.seconds > 0
    assert sorted(result.ranking) == sorted(llama_candidates()) and result.selected == result.ranking[:7]
    assert [result.scores[n] for n in result.ranking] == sorted(result.scores.values(), reverse=True)
    record = result.to_dict()
    assert set(record) == {
        "candidates",
        "scores",
        "ranking",
        "selected",
        "confidence",
        "provenance",
        "update_norms",
        "stage1",
        "stage2",
    }
    assert record["stage1"]["stop_reason"] == "max_steps" and record["stage2"]["steps"] == 4


def test_ties_are_broken_by_update_norm():
    batches = lm_batches(n_batches=2)
    config = ILAConfig(
        r=2, top_k=3, stage1_max_steps=5, stage2_steps=1, estimator="gates", gate_lr=1e-12
    )  # barely move
    model = get_peft_model(tiny_llama(), config)
    result = identify_important_layers(model, batches, progress=False)
    by_norm = sorted(result.update_norms, key=result.update_norms.get, reverse=True)
    assert result.ranking == by_norm


def test_kept_adapters_are_reinitialised_unless_asked(inputs):
    batches = lm_batches(n_batches=2)
    for keep in (False, True):
        base = tiny_llama()
        expected = base(**inputs).logits
        model = get_peft_model(
            base, ILAConfig(r=2, top_k=3, stage1_max_steps=5, stage2_steps=2, keep_stage1_weights=keep)
        )
        identify_important_layers(model, batches, progress=False)
        same = torch.allclose(model(**inputs).logits, expected)
        assert same is not keep


def test_identification_is_seeded_and_restores_trainability():
    batches = lm_batches(n_batches=2)
    runs = []
    for _ in range(2):
        model = get_peft_model(
            tiny_llama(), ILAConfig(r=2, top_k=3, lora_dropout=0.1, stage1_max_steps=6, stage2_steps=3)
        )
        runs.append(identify_important_layers(model, batches, progress=False))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trainable) == 6 and all(".ila_" in n for n in trainable)
    assert runs[0].scores == runs[1].scores and runs[0].selected == runs[1].selected


def test_misuse_is_refused():
    batches = lm_batches(n_batches=1)
    model = get_peft_model(tiny_llama(), ILAConfig(r=2, stage1_max_steps=2, stage2_steps=1))
    identify_important_layers(model, batches, progress=False)
    with pytest.raises(ValueError, match="already has selected layers"):
        identify_important_layers(model, batches, progress=False)
    one_shot = iter(lm_batches(n_batches=2))
    with pytest.raises(ValueError, match="ran out before stage 2"):
        identify_important_layers(get_peft_model(tiny_llama(), ILAConfig(stage1_max_steps=5)), one_shot, progress=False)
    two = get_peft_model(tiny_llama(), ILAConfig(r=2), adapter_name="first")
    two.add_adapter("second", ILAConfig(r=2))
    with pytest.raises(ValueError, match=r"'second' is not active; call model.set_adapter\('second'\)"):
        identify_important_layers(two, batches, adapter_name="second", progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="needs `labels`"):
        identify_important_layers(get_peft_model(tiny_llama(), ILAConfig()), no_labels, progress=False)


def test_result_does_not_depend_on_the_global_rng_before_identification():
    batches = lm_batches(n_batches=2)
    results = []
    for noise in (0, 123):
        base = tiny_llama()
        torch.manual_seed(noise)  # whatever happened before get_peft_model
        model = get_peft_model(base, ILAConfig(r=2, top_k=3, stage1_max_steps=4, stage2_steps=2))
        results.append(identify_important_layers(model, batches, progress=False))
    assert results[0].stage1.losses == results[1].stage1.losses and results[0].scores == results[1].scores


@pytest.mark.parametrize(
    ("bad_forward", "value", "where"), [(2, "nan", "stage 1: adapters"), (4, "inf", "stage 2: gates")]
)
def test_non_finite_loss_names_stage_and_step_and_selects_nothing(bad_forward, value, where):
    model = get_peft_model(tiny_llama(), ILAConfig(r=2, stage1_max_steps=2, stage2_steps=3, estimator="gates"))
    forwards = []

    def poison(module, args, output):
        forwards.append(1)
        return output * float(value) if len(forwards) == bad_forward else output

    model.base_model.model.lm_head.register_forward_hook(poison)
    # forwards 1-2 are stage 1's steps 1-2, forwards 3-4 stage 2's steps 1-2
    with pytest.raises(FloatingPointError, match=rf"ILA {where}: the loss became (nan|inf) at step 2"):
        identify_important_layers(model, lm_batches(2), progress=False)
    assert model.peft_config["default"].selected_layers is None and "default" in model.base_model.ila_gates


def test_the_config_names_exactly_the_estimators_there_are():
    from peft_ila.identification.estimators import ESTIMATORS
    from peft_ila.tuner.config import ESTIMATOR_NAMES

    assert tuple(ESTIMATORS) == ESTIMATOR_NAMES
    with pytest.raises(ValueError, match=r"ILAConfig\.estimator='fisher' is invalid: it must be 'gates' or"):
        ILAConfig(estimator="fisher")


def test_scoring_given_adapters_equals_the_estimator_stage_of_a_whole_run():
    batches, settings = lm_batches(5), dict(r=2, top_k=3, stage1_max_steps=4, stage2_steps=3, seed=2)
    whole = identify_important_layers(get_peft_model(tiny_llama(), ILAConfig(**settings)), batches, progress=False)
    keep = ILAConfig(**{**settings, "estimator": "update-norm", "top_k": 1.0, "keep_stage1_weights": True})
    trained = get_peft_model(tiny_llama(), keep)
    identify_important_layers(trained, batches, progress=False)  # stage 1 only, its weights kept on every layer
    stage1 = {n: p for n, p in trained.named_parameters() if ".ila_" in n}
    probe = get_peft_model(tiny_llama(), ILAConfig(**settings))
    assert probe.load_state_dict(stage1, strict=False).unexpected_keys == []
    rest = batches[4:] + batches[:4]  # stage 2 of the whole run continued after stage 1's four batches
    given = identify_important_layers(probe, rest, progress=False, train_stage1=False)
    assert given.stage1.steps == 0 and given.stage1.stop_reason == "skipped"
    assert given.scores == whole.scores and given.selected == whole.selected


@pytest.mark.parametrize("estimator", ["gates", "first-order"])
def test_confidence_comes_from_resampling_the_estimators_steps(estimator):
    settings = dict(r=2, top_k=5, stage1_max_steps=6, stage2_steps=8, gate_lr=0.2, estimator=estimator, seed=1)
    model = get_peft_model(tiny_llama(), ILAConfig(**settings))
    result = identify_important_layers(model, lm_batches(5), progress=False)
    confidence = result.selection.confidence
    assert set(confidence) == set(llama_candidates()) and all(0 <= c <= 1 for c in confidence.values())
    assert model.peft_config["default"].layer_confidence == confidence
    again = identify_important_layers(
        get_peft_model(tiny_llama(), ILAConfig(**settings)), lm_batches(5), progress=False
    )
    assert again.selection.confidence == confidence  # the bootstrap has its own seeded generator


def test_replaying_the_gates_stage_on_its_own_gradients_gives_its_gates():
    from peft_ila.identification.estimators import Gates
    from peft_ila.identification.importance import Identification

    config = ILAConfig(r=2, top_k=5, stage1_max_steps=4, stage2_steps=6, estimator="gates", gate_lr=0.2)
    recipe = Identification(get_peft_model(tiny_llama(), config))
    result = recipe.run(lm_batches(4), progress=False)
    history = recipe.optimizer2.state[recipe.bank.logits]["history"]
    assert history.shape == (6, 28)
    replayed = Gates(config).replay(history[None]).sigmoid()[0]
    gates = [result.scores[name] for name in recipe.candidates]
    torch.testing.assert_close(replayed.tolist(), gates, atol=1e-5, rtol=0)


def test_update_norm_has_no_stage_to_resample_and_no_confidence():
    config = ILAConfig(r=2, top_k=3, stage1_max_steps=4, estimator="update-norm")
    result = identify_important_layers(get_peft_model(tiny_llama(), config), lm_batches(3), progress=False)
    assert result.selection.confidence == {}


def test_the_per_step_hook_sees_every_step_of_both_stages_and_changes_nothing():
    from peft_ila.identification.importance import Identification

    fields = dict(r=2, top_k=3, stage1_max_steps=4, stability_epsilon=0.0, stage2_steps=3, estimator="gates")
    seen, stages = [], []

    def hook(stats) -> None:
        seen.append((stats.steps, sum(run.update_norms().values())))
        stages.append(run.stage)

    run = Identification(get_peft_model(tiny_llama(), ILAConfig(**fields)), on_step=hook)
    watched = run.run(lm_batches(3), progress=False)
    plain = identify_important_layers(get_peft_model(tiny_llama(), ILAConfig(**fields)), lm_batches(3), progress=False)
    assert [steps for steps, _ in seen] == [1, 2, 3, 4, 1, 2, 3]  # stage 1, then the gates' stage
    assert stages == [1, 1, 1, 1, 2, 2, 2]  # the hook can tell them apart, the last step of stage 1 too
    assert seen[0][1] > 0 and seen[3][1] == seen[4][1]  # the adapters' updates, frozen while the gates train
    assert watched.scores == plain.scores and watched.selected == plain.selected
