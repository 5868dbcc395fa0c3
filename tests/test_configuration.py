"""AdaFilterConfig: validation with clear errors, exact JSON round trip, nested backbone configs."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import FAMILIES, tiny_backbone_config

from hf_adafilter import AdaFilterConfig


def test_default_backbone_is_a_resnet50_shape():
    config = AdaFilterConfig()
    assert config.backbone_config.model_type == "resnet"
    assert list(config.backbone_config.depths) == [3, 4, 6, 3]
    assert config.gate_network == "lstm" and config.gated_norm is True


@pytest.mark.parametrize("family", FAMILIES)
def test_json_round_trip_is_exact_for_every_family(family, tmp_path):
    config = AdaFilterConfig(
        backbone_config=tiny_backbone_config(family).to_dict(),
        gate_network="gru",
        gumbel_temperature=2,
        target_modules=r"encoder\..*",
        exclude_modules=[r".*shortcut.*"],
        id2label={0: "cat", 1: "dog"},
        label2id={"cat": 0, "dog": 1},
    )
    assert isinstance(config.backbone_config, type(tiny_backbone_config(family)))
    assert config.gumbel_temperature == 2.0 and isinstance(config.gumbel_temperature, float)
    assert config.target_modules == [r"encoder\..*"]
    config.save_pretrained(tmp_path)
    reloaded = AdaFilterConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.to_json_string() == config.to_json_string()
    assert json.loads((tmp_path / "config.json").read_text())["backbone_config"]["model_type"] == family
    via_auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(via_auto) is AdaFilterConfig and via_auto.to_json_string() == config.to_json_string()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gate_network": "rnn"}, r"gate_network must be one of 'lstm', 'gru', 'independent', got 'rnn'"),
        (
            {"folded_weights_check": "none"},
            r"folded_weights_check must be one of 'content', 'version', got 'none'",
        ),
        ({"gate_hidden_size": 0}, r"gate_hidden_size must be an integer in \[1, 4096\], got 0"),
        ({"gate_input_size": 2.5}, r"gate_input_size must be an integer in \[1, 4096\], got 2.5"),
        ({"gumbel_temperature": 0}, r"gumbel_temperature must be > 0, got 0.0"),
        ({"gumbel_temperature": "hot"}, r"gumbel_temperature must be a number, got 'hot'"),
        ({"classifier_dropout": 1.5}, r"classifier_dropout must be in \[0, 1\), got 1.5"),
        ({"gated_norm": "yes"}, r"gated_norm must be True or False, got 'yes'"),
        ({"target_modules": "conv("}, r"target_modules has an invalid regex 'conv\('"),
        ({"exclude_modules": [3]}, r"exclude_modules must be a regex string or a list of them"),
        (
            {"backbone_config": {"model_type": "poolformer"}},
            r"model_type 'poolformer'.*Supported backbone families: resnet",
        ),
        ({"backbone_config": {"depths": [1]}}, r"backbone_config needs a `model_type` key"),
        ({"backbone": "microsoft/resnet-50"}, r"does not take `backbone=`.*from_backbone"),
        ({"gate_hidden_size": 20000}, r"gate_hidden_size must be an integer in \[1, 4096\], got 20000"),
        ({"gate_input_size": 10**9}, r"gate_input_size must be an integer in \[1, 4096\]"),
        (
            {"backbone_config": {"model_type": "no_such_model"}},
            r"'no_such_model'.*Supported backbone families",
        ),
        ({"gate_hiden_size": 8}, r"unknown key\(s\) 'gate_hiden_size': did you mean `gate_hidden_size`\?"),
        ({"revision": "v1"}, r"'revision'.*download setting: pass it to `from_pretrained` / `from_backbone`"),
        ({"frobnicate": 1}, r"unknown key\(s\) 'frobnicate'"),
    ],
)
def test_invalid_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdaFilterConfig(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_labels": 100_000_000}, r"num_labels 100000000 > 100000"),
        (
            {"backbone_config": {"model_type": "resnet", "depths": [100_000, 1]}},
            r"depths summing to 100001 blocks",
        ),
        (
            {"backbone_config": {"model_type": "resnet", "hidden_sizes": [8, 1 << 20]}},
            r"hidden_sizes 1048576 > 16384",
        ),
        (
            {"backbone_config": {"model_type": "efficientnet", "width_coefficient": 1000.0}},
            r"width_coefficient 1000.0 > 16.0",
        ),
    ],
)
def test_absurd_sizes_are_refused_before_allocation_naming_the_override(overrides, message, monkeypatch):
    with pytest.raises(ValueError, match=message + r".*HF_ADAFILTER_ALLOW_LARGE_CONFIGS=1"):
        AdaFilterConfig(**overrides)
    monkeypatch.setenv("HF_ADAFILTER_ALLOW_LARGE_CONFIGS", "1")
    if "num_labels" not in overrides:  # building a 100M-entry id2label would itself be the allocation
        AdaFilterConfig(**overrides)
