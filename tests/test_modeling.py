"""The AdaFilter model on every supported backbone family: exactness, gates, gradients, freezing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILIES, perturb_finetuned_bank, pixel_batch, random_backbone, tiny_backbone_config
from PIL import Image

from hf_adafilter import AdaFilterConfig, AdaFilterForImageClassification
from hf_adafilter.modeling.backbones import get_family
from hf_adafilter.modeling.layers import GatedLayer

TOLERANCE = 1e-5


def adafilter_from(backbone: transformers.PreTrainedModel, **overrides) -> AdaFilterForImageClassification:
    return AdaFilterForImageClassification.from_backbone(backbone, num_labels=5, **overrides)


def pooled(model: AdaFilterForImageClassification, pixels: torch.Tensor) -> torch.Tensor:
    return model.adafilter(pixels).pooler_output


def backbone_pooled(backbone: transformers.PreTrainedModel, pixels: torch.Tensor) -> torch.Tensor:
    """What the family's own classifier head reads of the plain backbone."""
    return get_family(backbone.config.model_type).pool(backbone(pixels))


def test_gates_forced_to_zero_reproduce_the_backbone(family):
    backbone = random_backbone(family)
    model = adafilter_from(backbone).eval()
    perturb_finetuned_bank(model)
    pixels = pixel_batch()
    expected = backbone_pooled(backbone, pixels)
    with torch.no_grad(), model.forced_gates(0.0):
        assert (pooled(model, pixels) - expected).abs().max() < TOLERANCE
    with torch.no_grad(), model.forced_gates(1.0):
        # Not a test that cannot fail: the perturbed bank must matter once selected.
        assert (pooled(model, pixels) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("gates", [None, 1.0])
def test_fresh_model_computes_the_backbone_for_any_gates(family, gates):
    backbone = random_backbone(family)
    model = adafilter_from(backbone).eval()
    pixels = pixel_batch()
    with torch.no_grad(), model.forced_gates(gates):
        out = model.adafilter(pixels)
    assert (out.pooler_output - backbone_pooled(backbone, pixels)).abs().max() < TOLERANCE
    if gates is None:
        decisions = torch.cat([g.flatten() for g in out.gates])
        assert 0 < decisions.mean() < 1, "the gate network should mix both banks at initialisation"


def test_gates_have_one_binary_decision_per_example_and_filter(family):
    model = adafilter_from(random_backbone(family))
    pixels = pixel_batch(batch_size=3)
    layers = model.adafilter.gated_layers
    for training in (True, False):
        model.train(training)
        out = model(pixels)
        assert len(out.gates) == len(layers) > 0
        for gates, layer in zip(out.gates, layers.values(), strict=True):
            assert gates.shape == (3, layer.out_channels)
            assert torch.all((gates == 0) | (gates == 1))
        if training:
            assert out.gate_probs is not None and len(out.gate_probs) == len(layers)
            assert all(((p > 0) & (p < 1)).all() for p in out.gate_probs)
        else:
            assert out.gate_probs is None


def test_gradients_reach_trainable_parts_and_never_the_frozen_bank(family):
    model = adafilter_from(random_backbone(family)).train()
    out = model(pixel_batch(), labels=torch.tensor([0, 1, 2, 3]))
    # The gate penalty makes the gate network's gradient independent of the loss landscape at init.
    (out.loss + sum(g.mean() for g in out.gates)).backward()
    layers = list(model.adafilter.gated_layers.values())
    assert all(layer.base_layer.weight.grad is None for layer in layers)
    assert all(not p.requires_grad for layer in layers for p in layer.base_layer.parameters())
    assert any(layer.finetuned_layer.weight.grad.abs().sum() > 0 for layer in layers)
    controller = model.adafilter.gate_controller
    assert all(head.weight.grad.abs().sum() > 0 for head in controller.heads)
    assert all(proj.weight.grad.abs().sum() > 0 for proj in controller.input_projections)
    assert model.classifier.weight.grad.abs().sum() > 0


def test_straight_through_gradient_is_nonzero_and_eval_gates_reproducible():
    model = adafilter_from(random_backbone("resnet"))
    pixels = pixel_batch()
    model.train()
    out = model(pixels)
    sum(g.sum() for g in out.gates).backward()
    head_grads = [head.weight.grad for head in model.adafilter.gate_controller.heads]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    torch.manual_seed(0)
    first = torch.cat([g.flatten() for g in model(pixels).gates])
    torch.manual_seed(1)
    second = torch.cat([g.flatten() for g in model(pixels).gates])
    assert not torch.equal(first, second), "training gates are sampled"
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        first = torch.cat([g.flatten() for g in model(pixels).gates])
        torch.manual_seed(1)
        second = torch.cat([g.flatten() for g in model(pixels).gates])
    assert torch.equal(first, second), "eval gates are deterministic"


def test_temperature_is_settable_and_sharpens_the_relaxation():
    model = adafilter_from(random_backbone("resnet")).train()
    pixels = pixel_batch()

    def gate_grad_norm(temperature: float) -> float:
        model.zero_grad()
        model.set_gumbel_temperature(temperature)
        torch.manual_seed(0)
        sum(g.sum() for g in model(pixels).gates).backward()
        return sum(head.weight.grad.abs().sum().item() for head in model.adafilter.gate_controller.heads)

    assert model.adafilter.gate_controller.temperature == 1.0
    # Same noise, lower temperature: the sigmoid is steeper near the decision boundary only, so gradients differ.
    assert gate_grad_norm(5.0) != gate_grad_norm(0.5)
    with pytest.raises(ValueError, match="temperature"):
        model.set_gumbel_temperature(0.0)


@pytest.mark.parametrize("gate_network", ["lstm", "gru", "independent"])
@pytest.mark.parametrize("gated_norm", [True, False])
def test_gate_network_variants_and_norm_ablation(gate_network, gated_norm):
    backbone = random_backbone("resnet")
    model = adafilter_from(backbone, gate_network=gate_network, gated_norm=gated_norm).eval()
    layers = model.adafilter.gated_layers.values()
    assert all((layer.finetuned_norm is not None) == gated_norm for layer in layers)
    pixels = pixel_batch()
    with torch.no_grad():
        assert (pooled(model, pixels) - backbone_pooled(backbone, pixels)).abs().max() < TOLERANCE
    model.train()
    out = model(pixels, labels=torch.tensor([0, 1, 2, 3]))
    # While both banks are equal the task loss cannot see the gates; a gate penalty can.
    (out.loss + sum(g.mean() for g in out.gates)).backward()
    cell = model.adafilter.gate_controller.cell
    assert (cell is None) == (gate_network == "independent")
    if cell is not None:
        assert cell.weight_ih.grad.abs().sum() > 0


def test_recurrent_state_links_the_layers():
    """With the shared LSTM, a layer's decisions depend on earlier layers; independent gates do not."""
    for network, linked in (("lstm", True), ("independent", False)):
        model = adafilter_from(random_backbone("resnet"), gate_network=network).eval()
        controller = model.adafilter.gate_controller
        with torch.no_grad():
            controller.heads[-1].weight.normal_()  # make the last layer's decisions sensitive to its features
            pooled_input = torch.randn(
                2, model.adafilter.gated_layers[model.gated_layer_names[-1]].in_channels
            )
            last = len(controller) - 1
            alone, _, _ = controller(last, pooled_input)
            _, _, state = controller(0, torch.randn(2, controller.input_projections[0].in_features) * 10)
            after_first, _, _ = controller(last, pooled_input, state)
        assert (not torch.equal(alone, after_first)) == linked


def test_default_targets_skip_stem_and_squeeze_excite(family):
    model = AdaFilterForImageClassification(AdaFilterConfig(backbone_config=tiny_backbone_config(family)))
    names = model.gated_layer_names
    assert names
    assert not any(stem in name for name in names for stem in ("embedder.", "embeddings.", "conv_stem."))
    assert not any("squeeze_excite" in name or ".attention." in name for name in names)
    layer_types = {type(layer.base_layer) for layer in model.adafilter.gated_layers.values()}
    if family == "convnext":
        assert torch.nn.Linear in layer_types
    if family == "bit":
        assert any(t.__name__ == "WeightStandardizedConv2d" for t in layer_types)


def test_target_and_exclude_modules_select_layers():
    config = tiny_backbone_config("resnet")
    stem = AdaFilterForImageClassification(
        AdaFilterConfig(backbone_config=config, target_modules=[r"embedder\.embedder\.convolution"])
    )
    assert stem.gated_layer_names == ["embedder.embedder.convolution"]
    no_shortcut = AdaFilterForImageClassification(
        AdaFilterConfig(backbone_config=config, exclude_modules=r".*shortcut.*")
    )
    default = AdaFilterForImageClassification(AdaFilterConfig(backbone_config=config))
    assert set(no_shortcut.gated_layer_names) < set(default.gated_layer_names)
    with pytest.raises(ValueError, match="No resnet layer matched"):
        AdaFilterForImageClassification(AdaFilterConfig(backbone_config=config, target_modules=["nothing"]))
    with pytest.raises(ValueError, match="gates only"):
        AdaFilterForImageClassification(
            AdaFilterConfig(backbone_config=config, target_modules=[r"embedder\.pooler"])
        )


def test_gated_layer_passes_conv_attributes_through():
    model = adafilter_from(random_backbone("mobilenet_v2"))
    layer = next(iter(model.adafilter.gated_layers.values()))
    assert isinstance(layer, GatedLayer)
    assert layer.stride == layer.base_layer.stride and layer.kernel_size == layer.base_layer.kernel_size
    assert layer.weight is layer.base_layer.weight


def test_frozen_bank_stays_bit_identical_through_training(family):
    backbone = random_backbone(family)
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = adafilter_from(backbone).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pixels, labels = pixel_batch(), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        optimizer.zero_grad()
        out = model(pixels, labels=labels)
        (out.loss + 0.1 * sum(g.mean() for g in out.gates)).backward()
        optimizer.step()
    frozen = model.adafilter.pretrained_state_dict()
    assert frozen, "there must be a frozen bank"
    for key, tensor in frozen.items():
        assert torch.equal(tensor, reference[key]), key
    moved = [
        not torch.equal(layer.finetuned_layer.weight, layer.base_layer.weight)
        for layer in model.adafilter.gated_layers.values()
    ]
    assert any(moved), "the trainable bank should have moved"


def test_from_backbone_keeps_the_head_and_labels_when_num_labels_is_omitted():
    torch.manual_seed(0)
    config = tiny_backbone_config("resnet")
    config.id2label = {0: "cat", 1: "dog", 2: "fox"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    source = transformers.ResNetForImageClassification(config).eval()
    model = AdaFilterForImageClassification.from_backbone(source)
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    pixels = pixel_batch()
    with torch.no_grad():
        assert (model(pixels).logits - source(pixels).logits).abs().max() < TOLERANCE
    relabelled = AdaFilterForImageClassification.from_backbone(source, id2label={0: "a", 1: "b"})
    assert relabelled.config.num_labels == 2 and relabelled.config.label2id == {"a": 0, "b": 1}
    assert "id2label" not in relabelled.config.backbone_config.to_diff_dict()


@pytest.mark.parametrize("family_name", FAMILIES)
def test_wrong_channel_count_is_a_clear_error(family_name):
    model = adafilter_from(random_backbone(family_name))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\).*RGB"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(torch.randn(3, 32, 32))


def test_labels_out_of_range_are_a_clear_error():
    model = adafilter_from(random_backbone("resnet"))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\], got values in \[0, 7\]"):
        model(pixel_batch(), labels=torch.tensor([0, 7, 1, 2]))


def test_unsupported_backbone_lists_the_supported_families():
    with pytest.raises(ValueError, match="Supported backbone families: resnet, efficientnet, convnext.*vit, deit"):
        AdaFilterConfig(backbone_config={"model_type": "poolformer"})
    poolformer = transformers.PoolFormerModel(
        transformers.PoolFormerConfig(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2)
    )
    with pytest.raises(ValueError, match="'poolformer' is not supported.*resnet"):
        AdaFilterForImageClassification.from_backbone(poolformer, num_labels=2)
    with pytest.raises(ValueError, match="no classification head"):
        AdaFilterForImageClassification.from_backbone(random_backbone("resnet"))


def test_config_decides_hidden_states_and_return_dict_when_the_argument_is_absent():
    model = adafilter_from(random_backbone("resnet")).eval()
    pixels = pixel_batch()
    with torch.no_grad():
        assert model(pixels).hidden_states is None
        model.config.output_hidden_states = True
        hidden = model(pixels).hidden_states
        assert hidden is not None and len(hidden) > 1
        assert model(pixels, output_hidden_states=False).hidden_states is None  # the argument overrides
        assert model.adafilter(pixels).hidden_states is not None
        model.config.return_dict = False
        assert isinstance(model(pixels), tuple)
        assert model(pixels, return_dict=True).logits.shape == (4, 5)


def test_from_backbone_refuses_unknown_keys_before_building():
    backbone = random_backbone("resnet")
    with pytest.raises(ValueError, match=r"'gate_hiden_size': did you mean `gate_hidden_size`"):
        adafilter_from(backbone, gate_hiden_size=8)
    with pytest.raises(ValueError, match=r"gate_hidden_size must be an integer in \[1, 4096\], got 20000"):
        adafilter_from(backbone, gate_hidden_size=20000)


def test_input_of_another_float_dtype_is_cast_and_integer_pixels_are_refused():
    model = adafilter_from(random_backbone("resnet")).eval()
    with torch.no_grad():
        assert (
            model(pixel_batch().double()).logits.dtype == torch.float32
        )  # as transformers' vision models do
    with pytest.raises(ValueError, match=r"pixel_values are torch.uint8: run the images through"):
        model(pixel_batch().to(torch.uint8))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_an_empty_batch_gives_an_empty_output_in_training_and_evaluation(family_name):
    backbone = random_backbone(family_name)
    try:
        backbone(torch.zeros(0, 3, 32, 32))
    except RuntimeError:
        pytest.skip(f"transformers' {family_name} backbone itself cannot run an empty batch")
    model = adafilter_from(backbone)
    for mode in (True, False):
        output = model.train(mode)(torch.zeros(0, 3, 32, 32), labels=None)
        assert output.logits.shape == (0, 5)
        assert all(g.shape[0] == 0 for g in output.gates)


def test_from_backbone_attaches_the_image_processor_so_a_saved_model_runs_in_a_pipeline(tmp_path):
    backbone_dir = tmp_path / "backbone"
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(tiny_backbone_config("resnet")).save_pretrained(backbone_dir)
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(
        backbone_dir
    )
    model = AdaFilterForImageClassification.from_backbone(str(backbone_dir), num_labels=3)
    assert model.image_processor is not None
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "out"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype("uint8"))
    assert len(classify(image)) == 3
    in_memory = AdaFilterForImageClassification.from_backbone(random_backbone("resnet"), num_labels=3)
    assert in_memory.image_processor is None  # nothing to attach: saving writes no processor


def test_export_bank_is_the_model_with_every_gate_forced_to_that_bank(family):
    model = adafilter_from(random_backbone(family))
    perturb_finetuned_bank(model)
    model.eval()
    pixels = pixel_batch()
    for bank, value in (("finetuned", 1.0), ("pretrained", 0.0)):
        plain = model.export_bank(bank)
        assert type(plain).__module__.startswith("transformers.models.")
        with torch.no_grad(), model.forced_gates(value):
            expected = model(pixels).logits
        with torch.no_grad():
            torch.testing.assert_close(plain(pixels).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r'"finetuned" or "pretrained", got \'both\''):
        model.export_bank("both")


def test_export_static_fixes_each_filter_to_its_majority_bank(family):
    model = adafilter_from(random_backbone(family))
    perturb_finetuned_bank(model)
    model.eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for head in model.adafilter.gate_controller.heads:  # example-independent, mixed decisions
            head.weight.zero_()
            head.bias.copy_(torch.randint(0, 2, head.bias.shape, generator=generator).float() * 8 - 4)
    pixels = pixel_batch()
    static = model.export_static([pixels[:2], pixels[2:]])
    assert type(static).__module__.startswith("transformers.models.")
    record = static.config.adafilter_static
    assert record["calibration_images"] == 4 and record["agreement"] == 1.0
    with torch.no_grad():
        expected = model(pixels)
        torch.testing.assert_close(static(pixels).logits, expected.logits, rtol=1e-4, atol=1e-5)
    for name, gates in zip(model.gated_layer_names, expected.gates, strict=True):
        assert record["layers"][name]["filters"] == "".join(str(int(g)) for g in gates[0].tolist())


def test_export_static_records_how_often_the_calibration_decisions_agree(tmp_path):
    model = adafilter_from(random_backbone("resnet"))
    perturb_finetuned_bank(model)
    with torch.no_grad():
        for head in model.adafilter.gate_controller.heads:
            head.weight.normal_(0, 2.0)  # decisions that differ between images
    model.eval()
    pixels = pixel_batch(8, seed=3)
    with torch.no_grad():
        gates = model(pixels).gates
    static = model.export_static(pixels)
    record = static.config.adafilter_static
    name, layer_gates = model.gated_layer_names[-1], gates[-1]
    share = layer_gates.mean(0)
    assert record["layers"][name]["filters"] == "".join("1" if s >= 0.5 else "0" for s in share.tolist())
    assert record["layers"][name]["agreement"] == pytest.approx(float(torch.maximum(share, 1 - share).mean()))
    assert 0.5 <= record["agreement"] < 1.0
    static.save_pretrained(tmp_path)  # the record travels with the saved config
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.adafilter_static == record
    with pytest.raises(ValueError, match="calibration images"):
        model.export_static([])


def test_print_trainable_parameters_shows_the_gate_network_apart(capsys):
    model = adafilter_from(random_backbone("resnet"))
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    gates = sum(p.numel() for p in model.gate_parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"gate network: {gates:,}" in line and f"head: {head:,}" in line
    assert line.startswith(f"trainable params: {trainable:,} (") and "|| all params:" in line


def test_classify_with_gate_fractions_returns_labels_and_each_images_fraction(tmp_path):
    from hf_adafilter.hub.prediction import classify_with_gate_fractions

    processor = transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0)
    model = adafilter_from(random_backbone("resnet"))
    perturb_finetuned_bank(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype("uint8")) for _ in range(3)]
    results = classify_with_gate_fractions(model, images, image_processor=processor, top_k=2)
    assert len(results) == 3 and all(len(r["labels"]) == 2 for r in results)
    assert all(0.0 <= r["finetuned_fraction"] <= 1.0 for r in results)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gates = model.eval()(pixels).gates
    expected = [float(sum(g[i].sum() for g in gates) / sum(g[i].numel() for g in gates)) for i in range(3)]
    assert [r["finetuned_fraction"] for r in results] == pytest.approx(expected)
    assert results[0]["labels"][0]["label"] in model.config.id2label.values()


def test_efficientnet_pools_with_a_global_pool_that_computes_the_same_numbers():
    """transformers' AvgPool2d(hidden_dim, ceil_mode=True) is lowered by torch.compile to a loop over the whole
    window; the family's prepare swaps in the global mean it computes."""
    backbone = random_backbone("efficientnet")
    assert isinstance(backbone.pooler, torch.nn.AvgPool2d)
    model = adafilter_from(backbone).eval()
    assert isinstance(model.adafilter.backbone.pooler, torch.nn.AdaptiveAvgPool2d)
    pixels = pixel_batch()
    with torch.no_grad():
        assert (pooled(model, pixels) - backbone_pooled(backbone, pixels)).abs().max() < TOLERANCE


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_statistics(family):
    """The banks of each gated layer are recomputed in backward; the gates are decided once and the BatchNorm
    running statistics take one update, as without checkpointing."""
    model = adafilter_from(random_backbone(family)).double().train()
    perturb_finetuned_bank(model)
    model.adafilter.gate_controller.noise_scale = 0.0
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.adafilter.gated_layers.values())
    pixels, labels = pixel_batch().double(), torch.tensor([0, 1, 2, 3])
    outputs = []
    for candidate in (model, checkpointed):
        torch.manual_seed(0)  # dropout and stochastic depth draw alike
        output = candidate(pixels, labels=labels)
        (output.loss + sum(g.sum() for g in output.gates)).backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=1e-12, atol=1e-12)
    for (name, expected), actual in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        if expected.grad is not None:
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-9, atol=1e-12, msg=name)
    for expected, actual in zip(model.buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(expected, actual)


def test_a_backbone_path_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(
        OSError, match=r"'/nonexistent/backbone': no such folder, and neither a packaged alias"
    ):
        AdaFilterForImageClassification.from_backbone("/nonexistent/backbone")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(OSError, match=r"a file, not a folder"):
        AdaFilterForImageClassification.from_backbone(str(a_file))


@pytest.mark.parametrize("family_name", ["vit", "deit", "dinov2", "swin"])
def test_a_vision_transformer_gates_its_mlp_by_default_and_attention_when_asked(family_name):
    backbone = random_backbone(family_name)
    default = adafilter_from(backbone)
    assert default.gated_layer_names and all(".mlp.fc" in name for name in default.gated_layer_names)
    everything = adafilter_from(backbone, target_modules=r".*\.attention\.[qkvo]_proj|.*\.mlp\.fc[12]")
    names = everything.gated_layer_names
    assert {name.rpartition(".")[2] for name in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    pixels = pixel_batch()
    perturb_finetuned_bank(everything)
    with torch.no_grad():
        expected = backbone_pooled(backbone, pixels)
        with everything.forced_gates(0.0):  # the pre-trained bank everywhere is the backbone, attention included
            assert (pooled(everything.eval(), pixels) - expected).abs().max() < TOLERANCE
        with everything.forced_gates(1.0):
            assert (pooled(everything, pixels) - expected).abs().max() > TOLERANCE
