"""The baselines a user would pick instead of AdaFilter: L2-SP, LoRA (through PEFT) and BitFit."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import transformers
from conftest import pixel_batch, tiny_backbone_config
from safetensors import safe_open
from torch import nn

from hf_adafilter.baselines.l2sp import L2SPPenalty
from hf_adafilter.baselines.lora import lora_targets
from hf_adafilter.training.arguments import BaselineArguments
from hf_adafilter.training.methods import (
    build_classifier,
    build_weight_penalty,
    classifier_head,
    count_parameters,
)
from hf_adafilter.training.trainer import AdaFilterTrainer

ID2LABEL = {0: "a", 1: "b", 2: "c"}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A tiny ResNet classifier saved on disk, as a Hub backbone would be."""
    folder = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(tiny_backbone_config("resnet")).save_pretrained(folder)
    return folder


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, len(ID2LABEL), (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def train(model: nn.Module, output_dir, method: str, steps: int = 3, **trainer_kwargs) -> AdaFilterTrainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = AdaFilterTrainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        weight_penalty=build_weight_penalty(method, model),
        **trainer_kwargs,
    )
    trainer.train()
    return trainer


def base_classifier(backbone_dir) -> nn.Module:
    return transformers.AutoModelForImageClassification.from_pretrained(
        backbone_dir,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
        ignore_mismatched_sizes=True,
    )


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixel_batch()).logits


@pytest.mark.parametrize("method", ["l2sp", "lora", "bitfit"])
def test_each_baseline_trains_and_its_saved_output_loads_back_with_identical_logits(
    backbone_dir, tmp_path, method
):
    model = build_classifier(method, str(backbone_dir), ID2LABEL)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = train(model, tmp_path, method)
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it trained
    trainer.save_model()
    expected = logits(model)
    if method == "lora":
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(base_classifier(backbone_dir), tmp_path)
    else:
        loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def test_l2sp_penalty_starts_at_the_head_term_and_its_gradient_matches_the_formula(backbone_dir):
    model = build_classifier("l2sp", str(backbone_dir), ID2LABEL)
    head = classifier_head(model)
    penalty = L2SPPenalty(model, head, alpha=0.3, beta=0.02)
    assert penalty.drift().item() == 0.0  # step 0: the weights are the reference
    head_norm = sum(p.pow(2).sum() for p in head.parameters())
    torch.testing.assert_close(penalty(), 0.01 * head_norm)
    reference = {id(p): p.detach().clone() for p in penalty.pretrained}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.zero_grad()
    penalty().backward()
    for p in penalty.pretrained:
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - reference[id(p)]))
    for p in head.parameters():
        torch.testing.assert_close(p.grad, 0.02 * p.detach())
    head_ids = {id(p) for p in head.parameters()}
    assert {id(p) for p in penalty.pretrained} == {id(p) for p in model.parameters() if id(p) not in head_ids}


def test_l2sp_replaces_weight_decay_and_its_reference_is_not_saved(backbone_dir, tmp_path):
    model = build_classifier("l2sp", str(backbone_dir), ID2LABEL)
    trainer = train(model, tmp_path, "l2sp", steps=1)
    penalised = {id(p) for p in trainer.weight_penalty.parameters()}
    assert len(penalised) == len([p for p in model.parameters() if p.requires_grad])
    for group in trainer.optimizer.param_groups:
        assert group["weight_decay"] == 0.0 or not penalised & {id(p) for p in group["params"]}
    assert all(not r.requires_grad for r in trainer.weight_penalty.reference)
    trainer.save_model()
    saved = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).state_dict()
    assert set(saved) == set(model.state_dict())
    # Fine-tuning keeps its weight decay.
    finetune = train(
        build_classifier("finetune", str(backbone_dir), ID2LABEL), tmp_path / "ft", "finetune", steps=1
    )
    assert finetune.weight_penalty is None
    assert any(group["weight_decay"] == 0.1 for group in finetune.optimizer.param_groups)


def test_lora_adapter_holds_no_base_weights(backbone_dir, tmp_path):
    model = build_classifier("lora", str(backbone_dir), ID2LABEL)
    train(model, tmp_path, "lora", steps=1).save_model()
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert any("lora_A" in key for key in keys) and any("classifier" in key for key in keys)
    assert all(
        "lora_" in key or "modules_to_save" in key or "classifier" in key or "normalization" in key
        for key in keys
    )
    base_convs = [
        name
        for name, module in base_classifier(backbone_dir).named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    assert not [key for key in keys if any(key.endswith(f"{conv}.weight") for conv in base_convs)]
    trainable, total = count_parameters(model)
    assert trainable < total / 2


def test_lora_targets_adafilters_layers_and_names_those_peft_refuses(caplog):
    torch.manual_seed(0)
    model = transformers.EfficientNetForImageClassification(tiny_backbone_config("efficientnet"))
    targets = lora_targets(model, r=8)
    assert targets.accepted and targets.refused
    assert all("depthwise" in name for name in targets.refused)
    assert all("squeeze_excite" not in name and "embeddings" not in name for name in targets.accepted)
    with caplog.at_level(logging.WARNING, logger="hf_adafilter.baselines.lora"):
        from hf_adafilter.baselines.lora import apply_lora

        peft_model = apply_lora(model, r=8)
    assert "LoRA skips" in caplog.text and next(iter(targets.refused)) in caplog.text
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == len(targets.accepted)


def test_lora_without_peft_names_the_install_command(backbone_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install"):
        build_classifier("lora", str(backbone_dir), ID2LABEL)


def test_bitfit_leaves_every_conv_and_linear_weight_bit_identical(backbone_dir, tmp_path):
    model = build_classifier("bitfit", str(backbone_dir), ID2LABEL)
    head = classifier_head(model)
    weights = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and module is not head
    }
    norms = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    }
    train(model, tmp_path, "bitfit")
    modules = dict(model.named_modules())
    assert weights and all(torch.equal(modules[name].weight, weight) for name, weight in weights.items())
    assert any(not torch.equal(modules[name].weight, weight) for name, weight in norms.items())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith("classifier") or name.endswith("bias") or "normalization" in name
        for name in trainable
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("l2sp_alpha", -1.0), ("l2sp_beta", -0.1), ("lora_r", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0)],
)
def test_baseline_arguments_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=f"--{field}"):
        BaselineArguments(**{field: value})
