"""AdaFilterTrainer on tiny random models: loss, regulariser, temperature, freezing, accumulation, logs."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from conftest import IMAGE_SIZE, tiny_backbone_config
from transformers import TrainingArguments

from hf_adafilter import AdaFilterConfig, AdaFilterForImageClassification
from hf_adafilter.metrics import build_compute_metrics
from hf_adafilter.metrics.gate_statistics import finetuned_fraction
from hf_adafilter.training.arguments import AdaFilterArguments
from hf_adafilter.training.regularization import gate_regularization
from hf_adafilter.training.trainer import AdaFilterTrainer, gumbel_temperature_at


def colour_dataset(size: int = 32, seed: int = 0) -> datasets.Dataset:
    """Two classes a CNN learns in a few steps: reddish vs bluish noise images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % 2
    pixels = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.5
    pixels[:, 0] += torch.where(labels == 0, 1.0, -1.0)[:, None, None]
    pixels[:, 2] -= torch.where(labels == 0, 1.0, -1.0)[:, None, None]
    dataset = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()})
    return dataset.with_format("torch")


def tiny_model(family: str = "resnet", **overrides) -> AdaFilterForImageClassification:
    torch.manual_seed(0)
    config = AdaFilterConfig(backbone_config=tiny_backbone_config(family), num_labels=2, **overrides)
    return AdaFilterForImageClassification(config)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        max_steps=12,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **overrides})


def mean_fraction(model: AdaFilterForImageClassification, dataset: datasets.Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(finetuned_fraction(model(dataset[:16]["pixel_values"]).gates))


def test_loss_is_finite_and_decreases_on_a_learnable_set(tmp_path):
    model = tiny_model()
    dataset = colour_dataset()
    trainer = AdaFilterTrainer(model=model, args=training_args(tmp_path, max_steps=16), train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] * 0.7, losses


@pytest.mark.parametrize(("kind", "target"), [("budget", 0.1), ("budget", 0.9), ("l1", 0.0)])
def test_regulariser_moves_the_finetuned_fraction_toward_its_target(tmp_path, kind, target):
    model = tiny_model()
    dataset = colour_dataset()
    before = mean_fraction(model, dataset)
    gate_args = AdaFilterArguments(
        gate_regularization=kind,
        gate_regularization_weight=10.0,
        gate_target_ratio=target,
        gate_learning_rate=0.05,
    )
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=20),
        train_dataset=dataset,
        adafilter_args=gate_args,
    )
    trainer.train()
    after = mean_fraction(model, dataset)
    assert abs(after - target) < abs(before - target) - 0.2, (before, after)


def test_regularizers_values():
    gates = (torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2))
    assert float(finetuned_fraction(gates)) == pytest.approx(5 / 12)
    assert float(gate_regularization(gates, "l1")) == pytest.approx(5 / 12)
    assert float(gate_regularization(gates, "budget", 0.25)) == pytest.approx((5 / 12 - 0.25) ** 2)
    assert float(gate_regularization(gates, "none")) == 0.0
    with pytest.raises(ValueError, match="gate_regularization must be one of none, l1, budget"):
        gate_regularization(gates, "l2")


def test_temperature_schedule_hits_its_end_value(tmp_path):
    model = tiny_model()
    gate_args = AdaFilterArguments(gumbel_temperature_start=4.0, gumbel_temperature_end=0.25)
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=9, logging_steps=1),
        train_dataset=colour_dataset(),
        adafilter_args=gate_args,
    )
    trainer.train()
    temperatures = [
        entry["gates/temperature"] for entry in trainer.state.log_history if "gates/temperature" in entry
    ]
    assert temperatures[0] == pytest.approx(4.0)
    assert temperatures[-1] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:], strict=False))
    assert model.adafilter.gate_controller.temperature == pytest.approx(0.25)
    # geometric: the midpoint is sqrt(4 * 0.25)
    assert gumbel_temperature_at(4, 9, 4.0, 0.25) == pytest.approx(1.0)


def test_frozen_bank_is_unchanged_by_training(tmp_path):
    model = tiny_model()
    frozen_before = {k: v.clone() for k, v in model.adafilter.pretrained_state_dict().items()}
    trainable_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = AdaFilterTrainer(
        model=model, args=training_args(tmp_path, weight_decay=0.5), train_dataset=colour_dataset()
    )
    trainer.train()
    frozen_after = model.adafilter.pretrained_state_dict()
    assert frozen_before.keys() == frozen_after.keys()
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])
    ]
    assert any("finetuned_layer" in n for n in moved) and any("gate_controller" in n for n in moved)


def test_gradient_accumulation_gives_the_same_update_as_one_big_batch(tmp_path):
    """ConvNeXt has no BatchNorm and fixed gates remove sampling, so 4 x 2 examples must equal 1 x 8."""
    results = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        model = tiny_model("convnext")
        args = training_args(
            tmp_path / f"ga{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            logging_steps=1,
            optim="sgd",
            learning_rate=0.5,
        )
        trainer = AdaFilterTrainer(model=model, args=args, train_dataset=colour_dataset())
        with model.forced_gates(1.0):
            trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_big, params_big), (loss_acc, params_acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)
    assert max((params_big[n] - params_acc[n]).abs().max() for n in params_big) < 1e-5


def test_gate_network_gets_its_own_learning_rate(tmp_path):
    model = tiny_model()
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, learning_rate=1e-3),
        train_dataset=colour_dataset(),
        adafilter_args=AdaFilterArguments(gate_learning_rate=5e-2),
    )
    optimizer = trainer.create_optimizer()
    gate_ids = {id(p) for p in model.gate_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen = set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen |= ids
        assert ids <= gate_ids or not ids & gate_ids, "gate and backbone parameters never share a group"
        assert group["lr"] == (5e-2 if ids <= gate_ids else 1e-3)
    assert seen == trainable, "every trainable parameter, and no frozen one, is optimised"


def test_the_optimizer_comes_from_the_trainers_own_machinery_with_the_gate_groups(tmp_path):
    """`--optim` (here SGD) still chooses the optimizer; only its groups are split for the gate learning rate."""
    model = tiny_model()
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, learning_rate=1e-3, optim="sgd"),
        train_dataset=colour_dataset(),
        adafilter_args=AdaFilterArguments(gate_learning_rate=5e-2),
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    gate_ids = {id(p) for p in model.gate_parameters()}
    rates = {group["lr"] for group in optimizer.param_groups if {id(p) for p in group["params"]} <= gate_ids}
    assert rates == {5e-2}
    assert trainer.create_optimizer() is optimizer  # built once


def test_logs_report_the_finetuned_fraction_overall_and_per_stage(tmp_path):
    model = tiny_model()
    dataset = colour_dataset()
    trainer = AdaFilterTrainer(
        model=model, args=training_args(tmp_path, max_steps=4), train_dataset=dataset, eval_dataset=dataset
    )
    trainer.train()
    train_log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert 0.0 < train_log["gates/finetuned_fraction"] < 1.0
    assert {"gates/stage1", "gates/stage2"} <= train_log.keys()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_gates/finetuned_fraction"] <= 1.0
    assert {"eval_gates/stage1", "eval_gates/stage2"} <= metrics.keys()
    assert list(trainer.last_eval_gate_fractions) == model.gated_layer_names
    widths = [layer.out_channels for layer in model.adafilter.gated_layers.values()]
    weighted = sum(f * w for f, w in zip(trainer.last_eval_gate_fractions.values(), widths, strict=True))
    assert metrics["eval_gates/finetuned_fraction"] == pytest.approx(weighted / sum(widths), abs=1e-6)


def test_logs_carry_the_gate_diagnostics_and_the_noise_reaches_its_end(tmp_path):
    model = tiny_model()
    dataset = colour_dataset()
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, logging_steps=1),
        train_dataset=dataset,
        adafilter_args=AdaFilterArguments(gate_noise_start=1.0, gate_noise_end=0.0),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("train_eval_agreement", "example_dependent", "mean_abs_log_odds"):
        assert all(f"gates/{key}" in entry for entry in logs), key
    assert [entry["gates/noise_scale"] for entry in logs] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # Without noise, every sampled training decision is the evaluation decision.
    assert logs[-1]["gates/train_eval_agreement"] == 1.0
    assert model.adafilter.gate_controller.noise_scale == 0.0


def test_forced_gate_evaluation_brackets_the_learned_gates(tmp_path):
    model = tiny_model(
        gate_init_log_odds=8.0
    )  # every gate starts (and, 2 steps on, stays) on the fine-tuned bank
    dataset = colour_dataset()
    trainer = AdaFilterTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        eval_dataset=dataset,
        compute_metrics=build_compute_metrics(),
    )
    trainer.train()
    learned = trainer.evaluate()
    fractions = dict(trainer.last_eval_gate_fractions)
    forced = trainer.evaluate_forced_gates(dataset)
    assert forced["eval_forced_finetuned_accuracy"] == learned["eval_accuracy"]
    assert forced["eval_forced_finetuned_loss"] == pytest.approx(learned["eval_loss"])
    assert 0.0 <= forced["eval_forced_pretrained_accuracy"] <= 1.0
    assert not any("gates/" in key for key in forced)
    assert trainer.last_eval_gate_fractions == fractions  # the learned gates' analysis is kept
    assert model.adafilter.gate_controller.forced_value is None
