"""How the gates are parameterised, initialised, sampled and diagnosed."""

from __future__ import annotations

import pytest
import torch
from conftest import pixel_batch, random_backbone

from hf_adafilter import AdaFilterConfig, AdaFilterForImageClassification
from hf_adafilter.modeling.gating import straight_through_gates
from hf_adafilter.training.trainer import gate_diagnostics, gate_noise_at


def adafilter_from(backbone, **overrides) -> AdaFilterForImageClassification:
    return AdaFilterForImageClassification.from_backbone(backbone, num_labels=5, **overrides)


def test_one_log_odds_per_filter_with_the_configured_prior():
    model = adafilter_from(random_backbone("resnet"), gate_init_log_odds=-2.5)
    controller = model.adafilter.gate_controller
    for head, layer in zip(controller.heads, model.adafilter.gated_layers.values(), strict=True):
        assert head.out_features == layer.out_channels  # not 2 logits per filter
        assert torch.equal(head.bias, torch.full_like(head.bias, -2.5))
    assert model.config.gate_init_log_odds == -2.5


@pytest.mark.parametrize(("prior", "expected"), [(-8.0, 0.0), (8.0, 1.0)])
def test_a_strong_prior_decides_before_training(prior, expected):
    model = adafilter_from(random_backbone("resnet"), gate_init_log_odds=prior).eval()
    with torch.no_grad():
        gates = model(pixel_batch()).gates
    assert all(torch.all(g == expected) for g in gates)


def test_prior_survives_save_and_load(tmp_path):
    model = adafilter_from(random_backbone("resnet"), gate_init_log_odds=-1.0)
    with torch.no_grad():
        model.adafilter.gate_controller.heads[0].bias.fill_(0.75)  # "trained"
    model.save_pretrained(tmp_path)
    loaded = AdaFilterForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(
        loaded.adafilter.gate_controller.heads[0].bias, model.adafilter.gate_controller.heads[0].bias
    )
    assert loaded.config.gate_init_log_odds == -1.0


def test_config_rejects_a_non_numeric_prior():
    with pytest.raises(ValueError, match="gate_init_log_odds"):
        AdaFilterConfig(gate_init_log_odds="low")


def test_noise_scale_zero_makes_training_decisions_the_eval_decisions_with_a_gradient():
    log_odds = torch.linspace(-3, 3, 61).repeat(8, 1).requires_grad_()
    gates = straight_through_gates(log_odds, temperature=1.0, noise_scale=0.0)
    assert torch.equal(gates.detach(), (log_odds > 0).float())
    gates.sum().backward()
    assert torch.allclose(log_odds.grad, torch.sigmoid(log_odds) * (1 - torch.sigmoid(log_odds)))
    torch.manual_seed(0)
    noisy = straight_through_gates(log_odds.detach(), temperature=1.0, noise_scale=1.0)
    assert not torch.equal(noisy, (log_odds > 0).float())  # with noise, some decisions flip


def test_noise_schedule_is_linear_and_ends_at_its_end_value():
    assert gate_noise_at(0, 101, 1.0, 0.0) == 1.0
    assert gate_noise_at(50, 101, 1.0, 0.0) == pytest.approx(0.5)
    assert gate_noise_at(100, 101, 1.0, 0.0) == 0.0
    assert gate_noise_at(500, 101, 1.0, 0.0) == 0.0


def test_gate_diagnostics_on_known_decisions():
    # Layer 0: 2 examples x 4 filters; filters 0-1 always F, filter 2 differs between examples, filter 3 always S.
    probs = (torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.3, 0.1]]),)
    sampled = (torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),)
    stats = gate_diagnostics(sampled, probs)
    assert stats["finetuned_fraction"].tolist() == [pytest.approx(3 / 8)]
    assert stats["example_dependent"].tolist() == [pytest.approx(1 / 4)]
    # Eval decisions: [1,1,1,0] and [1,1,0,0]; sampled differs in (0,2) and (1,1).
    assert stats["train_eval_agreement"].tolist() == [pytest.approx(6 / 8)]
    expected = torch.logit(probs[0]).abs().mean().item()
    assert stats["mean_abs_log_odds"].tolist() == [pytest.approx(expected, rel=1e-5)]
    # In evaluation there are no probabilities: the decisions themselves are the evaluation decisions.
    assert set(gate_diagnostics(sampled)) == {"finetuned_fraction", "example_dependent"}
